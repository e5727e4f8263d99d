"""The command-line options both CLIs take (`edge-agent start`, `coordinator run`, `coordinator bench`), once.

One name, type and help text each. Defaults stay at each command (the agent logs at info, the coordinator at
warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# where the data comes from (edgetrain.spec.DataLocation)
DataDirOpt = Annotated[Optional[Path], typer.Option(help="Folder with the data set's files.")]  # noqa: UP045
DataPathOpt = Annotated[Optional[Path], typer.Option(help="A csv/tsv file (datasets csv, tsv).")]  # noqa: UP045
TestPathOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    help="csv/tsv: your own test file (default: 10% of --data-path, at random per class).")]
ValPathOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    help="csv/tsv: your own val file, where the best round is chosen (default: 10% of train).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Download cache.")]  # noqa: UP045
NoDownloadOpt = Annotated[bool, typer.Option("--no-download", help="Never download data.")]
# serving and security
MetricsHostOpt = Annotated[str, typer.Option(help="Address for /metrics.")]
TokenEnvOpt = Annotated[str, typer.Option(help="Env variable holding the operator token.")]
TokenFileOpt = Annotated[Optional[Path], typer.Option(help="File holding the operator token.")]  # noqa: UP045
LogLevelOpt = Annotated[str, typer.Option(help="debug, info, warning, error or critical.")]
