"""``dice-ds tune``: pick a DICE policy for a quality budget and write it as a sample config.

Owns the subcommand: reading (or measuring, ``--measure``) the sensitivity table, fitting the
proxy-to-PSNR map on the measured quality table, the speed model (``dice_ds.plan``: per-phase
costs and link from a ``dice-ds bench`` JSON of the same model, or a GPU device/link preset), the
search (``dice_ds.tune.search``) and writing the chosen policy as a ``dice-ds sample --config``
JSON, validated by ``dice_ds.ds_config`` before it is written, plus a report JSON (``--report``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from dice_ds.bench.links import rate_bits
from dice_ds.config import ConfigError, get_flavor
from dice_ds.ds_config import convert_flat, resolve_ckpt, validate_data
from dice_ds.modes import Mode
from dice_ds.options import given, parse_options
from dice_ds.plan.costs import costs_from_flops, costs_from_phases
from dice_ds.plan.predict import build_plan, predict_plan
from dice_ds.plan.presets import EFFICIENCY, parse_device, parse_link
from dice_ds.plan.validate import fit_emulation, link_of, load, row, workload_of
from dice_ds.schedule import Schedule
from dice_ds.tune import evidence, quality, search, sensitivity, verify
from dice_ds.workload import Workload

DICE_FIXED = search.Policy("interweaved", (), 0, 0, 0, 2)
"""DICE's fixed policy; its layers are the shallow half (filled in for the model's depth)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dice-ds tune",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Fastest predicted DICE policy within a quality "
                                            "budget (docs/tune.md).")
    p.add_argument("--budget", required=True,
                   help="predicted PSNR vs sync EP in dB that the policy must keep (e.g. 40), or "
                        "'dice': no larger predicted deviation than DICE's fixed policy")
    p.add_argument("--sensitivity", default="docs/tune_sensitivity.json",
                   help="sensitivity table (JSON); with --measure it is written there")
    p.add_argument("--measure", action="store_true", help="measure the table first (one process)")
    p.add_argument("--ckpt", default="shipped:digits",
                   help="checkpoint (shipped:digits: the package's, from any directory); the "
                        "written config names it as given")
    p.add_argument("--model", default="digits")
    p.add_argument("--samples", type=int, default=64, help="--measure: samples in the run")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--quality", default="docs/quality.json",
                   help="measured PSNR vs sync per mode (dice-ds eval --sweep JSON) for the fit")
    p.add_argument("--world", type=int, default=2, help="EP ranks")
    p.add_argument("--batch", type=int, default=125, help="images per rank")
    p.add_argument("--bench-json", default=None,
                   help="speed model from this dice-ds bench JSON (its DP row and probe; the "
                        "bench job must be the same model)")
    p.add_argument("--link", default="300mbit", help="link preset, rate, or the bench's link name")
    p.add_argument("--emulation-from", default=None, metavar="BENCH_JSON",
                   help="emulated links: fit the emulation constants on this bench's --link rows "
                        "(dice_ds.plan.validate.fit_emulation) and use them in the speed model")
    p.add_argument("--speed-tolerance", type=float, default=0.05,
                   help="policies predicted within this fraction of the fastest feasible one "
                        "count as equally fast; the one with the best predicted quality wins")
    p.add_argument("--device", default="rtx4090", help="without --bench-json: device preset")
    p.add_argument("--out", default="configs/ds/digits_tuned.json")
    p.add_argument("--report", default="docs/tune_report.json",
                   help="the search report (not beside --out: configs/ds/*.json must all be configs)")
    p.add_argument("--evidence", type=int, default=0, metavar="N",
                   help="then sample N images with sync EP, DICE's fixed, the tuned policy and "
                        "the selective-sync modes (torchrun, --world ranks) and report PSNR vs "
                        "sync, digits-FID and the predictions (dice_ds.tune.evidence)")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="measure up to K shortlisted policies (the predicted Pareto front within "
                        "--verify-window of the fastest) with dice-ds bench on --link and choose "
                        "on measured time (dice_ds.tune.verify; shaped links need root)")
    p.add_argument("--verify-window", type=float, default=0.10,
                   help="shortlist policies predicted within this fraction of the fastest")
    p.add_argument("--verify-rounds", type=int, default=2)
    p.add_argument("--verify-out", default=None, help="directory for the verification bench")
    p.add_argument("--evidence-also", action="append", default=[], metavar="NAME=FLAGS",
                   help="--evidence: also sample this policy, given as dice-ds sample flags "
                        "(e.g. an earlier tune result; repeatable)")
    return p


def _also(items: list[str]) -> list:
    """``NAME=FLAGS`` items as modes: the flags parsed once into settings."""
    out = []
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip() or not flags.split():
            raise ValueError(f"--evidence-also {item!r}: use NAME='--ep --ep-async ...'")
        out.append(Mode(name.strip(), name.strip(), given(parse_options(flags.split()))))
    return out


def row_settings(r: dict) -> dict:
    """A quality-table row's settings (``dice-ds eval --sweep`` JSON): its ``settings``, or, in a
    table written before rows had them, its flags parsed as the sampler parses them."""
    if "settings" in r:
        return dict(r["settings"])
    return given(parse_options((r.get("flags") or "").split()))


def _speed_model(a, w: Workload):
    if a.bench_json:
        bench = load(a.bench_json)
        bw = workload_of(bench)
        dp = row(bench, a.link, "dp")
        if dp is None:
            raise ValueError(f"{a.bench_json}: no DP row on link {a.link!r}")
        if bw.cfg.name != w.cfg.name:
            raise ValueError(f"{a.bench_json} timed {bw.cfg.name}, not {w.cfg.name}")
        scale = (w.images_per_rank * (2 if w.cfg_guidance else 1)) / (
            bw.images_per_rank * (2 if bw.cfg_guidance else 1))
        costs = costs_from_phases(dp, bw.cfg.depth, bw.steps).scaled(scale)
        emu, note = None, ""
        if a.emulation_from:
            emu = fit_emulation(load(a.emulation_from), a.link)
            note = (f", emulation fitted on {a.emulation_from}: "
                    f"{1e9 * emu['cpu_per_byte']:.1f} ns CPU per byte moved")
        return (costs, link_of(bench, a.link, emu),
                f"bench {a.bench_json} ({a.link}), x{scale:g} rows{note}")
    dev = replace(parse_device(a.device), efficiency=EFFICIENCY)
    return costs_from_flops(w, dev.flops), parse_link(a.link), f"{dev.name} / {a.link}"


def _fit(path: str, table: dict, w: Workload, world: int) -> quality.PsnrFit:
    data = json.loads(Path(path).read_text())
    pts = []
    for r in data["rows"]:
        settings = row_settings(r)
        if (not settings.get("ep_async") or r.get("psnr_db") is None
                or settings.get("ep_async_skip_strategy") in ("high", "rand")):
            continue
        plan = build_plan(settings, w, world)
        pts.append((r["mode"], quality.deviation(Schedule.build(plan, w.steps, w.cfg.depth),
                                                 table), r["psnr_db"]))
    return quality.PsnrFit.fit(pts)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        ckpt = resolve_ckpt(a.ckpt)  # shipped:digits -> the package's file; written as given
        also = _also(a.evidence_also)
        if a.measure:
            table = sensitivity.measure(ckpt, a.model, a.samples, a.steps, a.cfg_scale)
            sensitivity.save(table, a.sensitivity)
        table = sensitivity.load(a.sensitivity)
        cfg = get_flavor(a.model)
        w = Workload(cfg, images_per_rank=a.batch, cfg_guidance=a.cfg_scale > 1, steps=a.steps,
                     dtype="fp32")
        costs, link, speed_src = _speed_model(a, w)
        fit = _fit(a.quality, table, w, a.world)
        sync = predict_plan(search.Policy(period=1).plan(a.world).validate(
            world_size=a.world, num_experts=cfg.num_experts, depth=cfg.depth), w, costs, link)

        def score(plan):
            """(predicted speed-up over sync EP, deviation D) of a validated plan."""
            t = predict_plan(plan, w, costs, link)["batch_seconds"]
            return sync["batch_seconds"] / t, quality.deviation(
                Schedule.build(plan, w.steps, cfg.depth), table)

        def evaluate(p: search.Policy):
            return score(p.plan(a.world).validate(world_size=a.world,
                                                  num_experts=cfg.num_experts, depth=cfg.depth))

        dice = replace(DICE_FIXED, layers=tuple(range(cfg.depth // 2)))
        dice_speed, dice_d = evaluate(dice)
        if a.budget == "dice":
            d_max = dice_d
        else:
            d_max = fit.max_deviation(float(a.budget.removesuffix("dB")))
        if a.verify < 0 or a.verify_rounds < 1 or not 0 < a.verify_window < 1:
            raise ValueError("--verify K >= 0, --verify-rounds >= 1, --verify-window in (0, 1)")
        if a.verify and a.link != "loopback":
            rate_bits(a.link)   # a tc rate the bench can shape, else ValueError
        if not 0 <= a.speed_tolerance < 1:
            raise ValueError(f"--speed-tolerance {a.speed_tolerance}: use a fraction in [0, 1)")
        best, seen = search.search(cfg.depth, evaluate, d_max, tolerance=a.speed_tolerance)
    except (ValueError, KeyError, ConfigError, OSError) as e:
        print(f"dice-ds tune: error: {e}", file=sys.stderr)
        return 2
    if best is None:
        print(f"dice-ds tune: no policy meets the budget {a.budget} (not even sync EP)",
              file=sys.stderr)
        return 1
    policy, speed, dev = best
    verified = None
    if a.verify:
        cands = verify.shortlist(seen, d_max, a.verify_window, a.verify, keep=best)
        try:
            got = verify.measure(cands, model=a.model, ckpt=ckpt, image_size=cfg.input_size * 8,
                                 steps=a.steps, batch=a.batch, link=a.link,
                                 rounds=a.verify_rounds, out=a.verify_out,
                                 log=lambda m: print(m, file=sys.stderr))
        except RuntimeError as e:
            print(f"dice-ds tune: error: {e}", file=sys.stderr)
            return 1
        pick = verify.choose(cands, got["speedup"], a.speed_tolerance)
        if pick is None:
            print("dice-ds tune: --verify measured no candidate (shaped links need root)",
                  file=sys.stderr)
            return 1
        policy, measured, dev = pick
        speed = next(s for p, s, _ in cands if p == policy)
        verified = {"bench": got["bench"], "link": a.link, "rounds": a.verify_rounds,
                    "window": a.verify_window, "chosen_measured": measured,
                    "candidates": [{"flags": " ".join(p.flags()), "predicted": s, "deviation": d,
                                    "psnr_pred": fit.psnr(d),
                                    "measured": got["speedup"].get(p)}
                                   for p, s, d in cands]}
        for c in verified["candidates"]:
            print(f"  {c['flags']:110} predicted {c['predicted']:.2f}x measured "
                  f"{c['measured'] or float('nan'):.2f}x, {c['psnr_pred']:.1f} dB",
                  file=sys.stderr)
    a.command = "dice-ds tune " + " ".join(argv if argv is not None else sys.argv[1:])
    report = _write(a, policy, speed, dev, fit, dice, dice_speed, dice_d, d_max, speed_src, seen,
                    table, verified)
    if a.evidence:
        rows = evidence.run(ckpt, policy.settings(), a.evidence, a.steps, a.cfg_scale, a.world,
                            log=lambda m: print(m, file=sys.stderr), also=also)
        pred = {"DICE (fixed)": report["dice_fixed"], "tuned": report["chosen"]}
        for r in rows:
            p = pred.get(r["policy"])
            if p is None and r["key"] != "sync":
                s, d = score(build_plan(r["settings"], w, a.world))
                p = {"speedup": s, "deviation": d, "psnr_pred": fit.psnr(d)}
            p = p or {"speedup": 1.0, "psnr_pred": float("inf")}
            r.update(psnr_pred=p["psnr_pred"], speedup_pred=p["speedup"])
            print(f"{r['policy']:28} PSNR vs sync {r.get('psnr_db', float('nan')):6.2f} dB "
                  f"(predicted {p['psnr_pred']:.1f}), digits-FID "
                  f"{r.get('digits_fid', float('nan')):.2f}, class acc "
                  f"{100 * r.get('class_accuracy', float('nan')):.1f} %, predicted speed-up "
                  f"{p['speedup']:.2f}x")
        report["evidence"] = rows
        Path(a.report).write_text(json.dumps(report, indent=1,
                                                                      default=str) + "\n")
    return 0


def _write(a, policy, speed, dev, fit, dice, dice_speed, dice_d, d_max, speed_src, seen,
           table, verified=None) -> dict:
    opts = {"model": a.model, "ckpt": a.ckpt, "vae": "identity", "device": "cpu", "sampler": "rf",
            "num_sampling_steps": a.steps, "cfg_scale": a.cfg_scale,
            "per_proc_batch_size": a.batch, **policy.settings()}
    data = {"description": (f"dice-ds tune --budget {a.budget}: predicted {speed:.2f}x over sync "
                            f"EP ({speed_src}), predicted PSNR vs sync {fit.psnr(dev):.1f} dB; "
                            f"DICE's fixed policy: {dice_speed:.2f}x, {fit.psnr(dice_d):.1f} dB"
                            + (f"; measured {verified['chosen_measured']:.2f}x on "
                               f"{verified['link']}, chosen on measured time among "
                               f"{len(verified['candidates'])} shortlisted (--verify; speed-ups "
                               f"within {100 * a.speed_tolerance:.0f} % tie, the smaller "
                               "deviation wins)" if verified else "")),
            **convert_flat(opts)}
    validate_data(data, a.out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(data, indent=2) + "\n")
    unique = search.distinct(seen)
    top = sorted((x for x in unique if x[2] <= d_max), key=lambda x: -x[1])[:10]
    report = {"command": a.command,
              "budget": a.budget, "d_max": d_max, "speed_model": speed_src,
              "fit": {"a": fit.a, "b": fit.b, "points": fit.residuals},
              "chosen": {"flags": " ".join(policy.flags()), "speedup": speed, "deviation": dev,
                         "psnr_pred": fit.psnr(dev)},
              "dice_fixed": {"flags": " ".join(dice.flags()), "speedup": dice_speed,
                             "deviation": dice_d, "psnr_pred": fit.psnr(dice_d)},
              "verify": verified,
              "evaluated": len(seen), "distinct": len(unique),
              "speed_tolerance": a.speed_tolerance,
              "top_feasible": [{"flags": " ".join(p.flags()), "speedup": s, "deviation": d,
                                "psnr_pred": fit.psnr(d)} for p, s, d in top],
              "layer_sensitivity_mean": [sum(row) / max(1, len(row) - 1)
                                         for row in table["stale"]["1"]]}
    rep = Path(a.report)
    rep.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"chosen: {' '.join(policy.flags())}\n  predicted {speed:.2f}x over sync EP, "
          f"PSNR vs sync {fit.psnr(dev):.1f} dB (deviation {dev:.3f}, budget {d_max:.3f})\n"
          f"DICE fixed: {' '.join(dice.flags())}\n  predicted {dice_speed:.2f}x, "
          f"{fit.psnr(dice_d):.1f} dB (deviation {dice_d:.3f})\n"
          f"fit PSNR = {fit.a:.2f} - {fit.b:.2f} * 10 log10(D) over {len(fit.residuals)} modes\n"
          f"wrote {a.out} and {rep}")
    return report


if __name__ == "__main__":
    sys.exit(main())
