from simclr_path.cli.main import cli

cli(prog_name="simclr-path")
