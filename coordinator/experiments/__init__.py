"""Paper reproduction and peer comparisons behind `coordinator bench parallel` and `coordinator bench affinity`.

Reproduces the two experiments of "Accelerating the training of ANNs using data parallelization"
(ANNSIM'23) on the user's own machine, one module each:

* `parallel` (`run_parallel`): the same training (model, data, per-worker batch, total samples) run serially in
  one process on all allowed cores, data-parallel over N pinned local agents through the real coordinator,
  as plain PyTorch in one process, as torch DistributedDataParallel over N pinned processes, and on a
  GPU when there is one (the paper's Figure 1).
* `affinity` (`run_affinity`): a fixed amount of training pinned to growing sets of cores, each repeated, with
  the paper's "% gain vs slowest" (its Table 1); and a processes x threads layout sweep.

What both share (settings, the machine, other load, one measured run, the serial loop) is in `common`, their
tables' cells and Markdown in `tables`. The functions return rows (dataclasses); `write_parallel` /
`write_affinity` turn them into a Markdown table, a CSV and a PNG. Every configuration runs in fresh processes
pinned before torch starts its threads, and is timed from the moment its data and model are ready (start-up is
not training). This package re-exports each module's public names: `from edgetrain.coordinator import
experiments as ex; ex.run_parallel(...)`.
"""

from __future__ import annotations

from .affinity import (
    AffinityReport,
    AffinityRow,
    affinity_cells,
    affinity_csv,
    affinity_headers,
    affinity_markdown,
    affinity_png,
    chosen_layout,
    chosen_sentence,
    default_affinity_counts,
    fill_gains,
    parse_affinity,
    parse_layouts,
    run_affinity,
    write_affinity,
)
from .common import (
    QUIET_BUSY,
    BenchSettings,
    DataFacts,
    LoadProbe,
    Machine,
    Measured,
    check_agents,
    console,
    data_facts,
    edgetrain_serial,
    load_average,
    machine_busy_seconds,
    machine_info,
    max_pct,
    measure,
    own_cpu_seconds,
    progress_steps,
    result_line,
    wait_until_quiet,
)
from .parallel import (
    ParallelPlan,
    ParallelReport,
    ParallelRow,
    parallel_cells,
    parallel_csv,
    parallel_headers,
    parallel_markdown,
    parallel_png,
    parallel_ratios,
    plan_parallel,
    run_parallel,
    startup_seconds,
    write_parallel,
)
from .tables import (
    csv_cell,
    markdown_table,
    num_cell,
    ratio_cell,
    rich_table,
    settings_line,
)

__all__ = [
    "AffinityReport", "AffinityRow", "BenchSettings", "DataFacts", "LoadProbe", "Machine", "Measured", "ParallelPlan",
    "ParallelReport", "ParallelRow", "QUIET_BUSY", "affinity_cells", "affinity_csv", "affinity_headers",
    "affinity_markdown", "affinity_png", "check_agents", "chosen_layout", "chosen_sentence", "console", "csv_cell",
    "data_facts", "default_affinity_counts", "edgetrain_serial", "fill_gains", "load_average", "machine_busy_seconds",
    "machine_info", "markdown_table", "max_pct", "measure", "num_cell", "own_cpu_seconds", "parallel_cells",
    "parallel_csv", "parallel_headers", "parallel_markdown", "parallel_png", "parallel_ratios", "parse_affinity",
    "parse_layouts", "plan_parallel", "progress_steps", "ratio_cell", "result_line", "rich_table", "run_affinity",
    "run_parallel", "settings_line", "startup_seconds", "wait_until_quiet", "write_affinity", "write_parallel",
]
