"""``embed``, ``ingest`` and ``eval``: using the encoder."""

from __future__ import annotations

import click

from simclr_path.cli.options import exclude_qc_option
from simclr_path.cli.output import echo_json


@click.command(epilog="""\b
Example:
  simclr-path embed encoder.pt patches.h5 --out features/
  -> features/h5_files/<slide>.h5, features/pt_files/<slide>.pt, features/features.h5
  Rerun the same command to resume: slides already embedded with this encoder are skipped.
""")
@click.argument("encoder", type=click.Path(dir_okay=False))
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch", type=int, default=256, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@exclude_qc_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def embed(encoder, stores, out, device, batch, workers, exclude_qc, quiet):
    """Encoder features for every patch, per slide in CLAM's/TRIDENT's layout plus one combined h5.

    Streams batch by batch (memory does not grow with the number of patches) and resumes per
    slide: a slide is skipped when its files hold this encoder's features of the same patches, and
    recomputed when the encoder or the slide's patches in the store changed.
    """
    from simclr_path.downstream.embed import embed_stores
    from simclr_path.runtime.console import Reporter

    echo_json(embed_stores(encoder, list(stores), out, device=device, batch_size=batch, workers=workers,
                            exclude_qc=exclude_qc, reporter=Reporter(enabled=not quiet)))


@click.command(epilog="""\b
Examples:
  simclr-path ingest pcam/valid --out pcam-valid.h5 --mpp 0.97      # folder per class: labels kept
  simclr-path ingest my_tiles/ --out tiles.h5 --size 224 --no-labels
  simclr-path ingest pcam/valid --out v.h5 --qc off                 # no QC datasets, as before QC
""")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="New patch store (.h5).")
@click.option("--size", type=int, default=None, help="Resize every image to SIZE x SIZE [default: keep].")
@click.option("--mpp", type=float, default=None, help="Microns per pixel of the images, if known.")
@click.option("--labels/--no-labels", default=True, show_default=True, help="Keep top-level folder names as labels.")
@click.option("--qc", "qc", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Flag pen ink, blur and folds per image as 'tile' does, blur and folds against each top-level "
                   "folder (stored; pretrain/embed/select leave pen and blur out).")
def ingest(folder, out, size, mpp, labels, qc):
    """Put a folder of patch images (png/jpg/tif, recursively) into a patch store."""
    from simclr_path.store.ingest import ingest_folder
    from simclr_path.wsi.qc import PatchQC

    echo_json(ingest_folder(folder, out, size=size, labels=labels, mpp=mpp, qc=PatchQC() if qc == "on" else None))


@click.command("eval", epilog="""\b
Examples:
  simclr-path eval encoder.pt --labeled pcam/valid --test pcam/test
  simclr-path eval encoder.pt --labeled labels.csv            # path,label[,split][,group]
  simclr-path eval encoder.pt --labeled tiles.h5 --test-fraction 0.3 --seed 1
  simclr-path eval encoder.pt --labeled crc/ --group-regex '^(GT\\d+)-'   # split by patient
""")
@click.argument("encoder", type=click.Path(dir_okay=False))
@click.option("--labeled", required=True,
              help="Class folders, a path,label[,split][,group] CSV, or a labelled store.")
@click.option("--test", default=None, help="Held-out set in the same form [default: split --labeled].")
@click.option("--test-fraction", type=float, default=0.3, show_default=True)
@click.option("--group-regex", default=None,
              help="Read each patch's group (patient/case/slide) from its file name: the regex's first capture "
                   "group, else its whole match. With groups (this, or a CSV 'group' column) every split is by "
                   "group.")
@click.option("--max-per-class", type=int, default=None, help="Subsample each class (faster).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--batch", type=int, default=128, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--no-floor", is_flag=True, help="Skip the random-init floor.")
def evaluate(encoder, labeled, test, test_fraction, group_regex, max_per_class, seed, device, batch, workers,
             no_floor):
    """kNN (k=20, cosine, weighted) and linear-probe accuracy of an encoder, vs a random-init floor.

    One JSON line on stdout, a table on stderr.
    """
    from simclr_path.downstream.evaluate import evaluate_encoder
    from simclr_path.runtime.console import stderr_console

    result = evaluate_encoder(encoder, labeled, test, test_fraction, seed, max_per_class, device, batch, workers,
                              random_floor=not no_floor, group_regex=group_regex)
    from rich.table import Table

    title = f"{result['timm_model']}: {result['n_train']} train / {result['n_test']} test patches"
    if "groups" in result:
        title += f" ({result['groups']['train']} / {result['groups']['test']} groups)"
    table = Table(title=title)
    table.add_column("encoder")
    for column in ("kNN acc", "kNN bal. acc", "linear acc", "linear bal. acc"):
        table.add_column(column, justify="right")
    for name in ("pretrained", "random_init"):
        if name in result:
            r = result[name]
            table.add_row(name, *(f"{r[k]:.3f}" for k in ("knn_acc", "knn_balanced_acc", "linear_acc",
                                                           "linear_balanced_acc")))
    stderr_console().print(table)
    echo_json(result)


COMMANDS = [embed, ingest, evaluate]
