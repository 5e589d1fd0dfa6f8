"""Rebuild a run directory's tables and figures from Ray's files.

python -m pbt_lab.results RUN_DIR

A Ray run of another trainable under LabPBT has no lab tables: its restores are audited from the
records it reports (``tuning/audited.py``), one console line each that fails, exit 1 if any does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pbt_lab import OneLineParser, UserError
from pbt_lab.results.audit import audit_digests, digest_audit_lines
from pbt_lab.results.console import console_summary, exit_status
from pbt_lab.results.lineage import read_pbt_state
from pbt_lab.results.ray_files import another_trainables_run, read_progress, read_reports
from pbt_lab.results.tables import write_tables
from pbt_lab.storage import is_storage_full, is_uri


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m pbt_lab.results", description="Rebuild a run directory's tables and figures."
    )
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    if not is_uri(args.run_dir) and another_trainables_run(Path(args.run_dir)):
        # A Ray run of another trainable under LabPBT: its restores audited from the records it reports.
        run_dir, decisions = Path(args.run_dir), read_pbt_state(args.run_dir).get("decisions", [])
        restores = audit_digests(read_reports(run_dir, {}), decisions, read_progress(run_dir))
        lines, passed = digest_audit_lines(restores)
        print("\n".join(lines))
        return 0 if passed else 1
    try:
        tables = write_tables(args.run_dir)
    except UserError as e:
        parser.error(str(e))
    except OSError as e:
        if not is_storage_full(e):
            raise
        parser.exit(1, f"{parser.prog}: {args.run_dir}: its storage is full, the tables were not written\n")
    print(console_summary(tables, args.run_dir if is_uri(args.run_dir) else Path(args.run_dir)))
    # The commands' own, and 1 for a run cut short (its command stopped with 1 too)
    return max(exit_status(tables), int(bool(tables["summary"]["incomplete"])))


if __name__ == "__main__":
    sys.exit(main())
