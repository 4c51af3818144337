"""The remote-sensing preparation step: `data_tools.filter` with the RS defaults.

    python -m data_tools.prepare --data NWPU-RSICD-UAV-UCM-LR-DOTA-intrcutions.json \\
        --image-folder data/imagenes --out data/dataset.json

Keeps the four sources of the RS instruction set that the project trains on (NWPU, RSICD, LR,
DOTA; UAV and UCM are dropped), derives each sample's source from the first folder of its image
path, and writes it into the `source` field. Every `data_tools.filter` flag works here too.
"""
from __future__ import annotations

from .filter import build_parser, run
from .io import cli_errors

RS_SOURCES = ["NWPU", "RSICD", "LR", "DOTA"]


@cli_errors
def main(argv=None) -> int:
    return run(argv, build_parser(default_keep=RS_SOURCES, prog="python -m data_tools.prepare", description=__doc__))


if __name__ == "__main__":
    raise SystemExit(main())
