"""``dice-ds placement``: compute a balanced expert placement file from measured routing rows.

Owns the subcommand's flags and what it reads: ``--rows FILE`` is either a ``dice-ds sample``
run.json (its ``expert_placement.expert_rows``: rows per logical expert of every MoE layer, all
ranks, the whole run; EP size default: the run's) or a bench ``.loads.json`` sidecar
(``--link``: one link's ``"step,layer": [rows ...]`` table; its rows are per EP rank, which are the
rows per expert only where every rank held one expert, E = W, as in docs/bench_ranks_n8.loads.json).
Writes ``--out`` (``dice_ds.placement.Placement.write``; a run takes it with
``--expert-placement FILE``) and prints, per layer, the busiest rank's rows over the mean under
the contiguous and the balanced placement.
"""

from __future__ import annotations

import argparse
import json
import sys

from dice_ds.config import ConfigError
from dice_ds.placement import balanced, contiguous, imbalance, rank_rows, rows_from_loads


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dice-ds placement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, metavar="FILE",
                   help="run.json of a dice-ds sample run, or a bench .loads.json")
    p.add_argument("--link", default=None, help="the .loads.json link (default: its first)")
    p.add_argument("--ep-size", type=int, default=None,
                   help="EP ranks to place on (default: the run's; a .loads.json: its ranks)")
    p.add_argument("--replicas", type=int, default=0,
                   help="extra expert slots per rank for copies of the hottest experts")
    p.add_argument("--out", required=True, metavar="FILE", help="the placement file to write")
    return p


def rows_of(path: str, link: str | None) -> tuple[list[list[float]], int | None, str]:
    """(rows per logical expert and layer, the EP size they were measured at, a source line)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise ConfigError(f"--rows {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--rows {path}: not JSON ({e.msg})") from None
    record = data.get("expert_placement") if isinstance(data, dict) else None
    if isinstance(record, dict):
        if not record.get("expert_rows"):
            raise ConfigError(f"--rows {path}: the run measured no routing rows (DP without MoE "
                              "calls?): give a run that sampled at least one batch")
        return record["expert_rows"], data.get("ep_size"), f"run {path}"
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        link = link or next(iter(data))
        if link not in data:
            raise ConfigError(f"--link {link}: {path} has links {', '.join(data)}")
        table = data[link]
        return rows_from_loads(table), len(next(iter(table.values()))), f"{path} [{link}]"
    raise ConfigError(f"--rows {path}: neither a run.json (with expert_placement) nor a bench "
                      ".loads.json: give one of them")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        rows, measured_ep, source = rows_of(a.rows, a.link)
        ep = a.ep_size or measured_ep
        if not ep or ep < 1:
            raise ConfigError("--ep-size: give the EP size to place on")
        placement = balanced(rows, ep, a.replicas, source=source)
    except ConfigError as e:
        print(f"dice-ds placement: error: {e}", file=sys.stderr)
        return 2
    placement.write(a.out)
    before = rank_rows(contiguous(placement.num_experts, ep, placement.depth), rows)
    after = rank_rows(placement, rows)
    for l, (b, c) in enumerate(zip(before, after)):
        print(f"layer {l:3}: busiest rank / mean {imbalance(b):5.2f} contiguous -> "
              f"{imbalance(c):5.2f} balanced")
    print(f"dice-ds placement: wrote {a.out} (E={placement.num_experts}, EP {ep}, "
          f"{placement.slots_per_rank} slots per rank, worst layer "
          f"{max(imbalance(r) for r in before):.2f} -> {max(imbalance(r) for r in after):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
