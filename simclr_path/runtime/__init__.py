"""Where code runs: device choice, the process group and launching, console output.

The lowest layer of the package: every stage may import it, it imports no stage.
"""
