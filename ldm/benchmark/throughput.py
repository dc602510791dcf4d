"""Throughput of data-parallel generation: txt2img under torchrun at 1, 2, ... N ranks (``ldm-benchmark
--throughput 1,2,4,8``), each rank a full model on its own device (cuda:LOCAL_RANK; the CPU with gloo elsewhere).

Each run is a fresh ``torchrun --standalone --nproc_per_node R -m ldm.apps.txt2img`` job over the same work:
``--n_iter`` batches of ``--batch`` images, shared out between the ranks (``ldm.apps.distributed``), after one
untimed warm-up batch per rank. Its timed seconds are the job's (the time file rank 0 writes: per round of batches
the slowest rank's sampling and decoding), so images/s is the whole job's; the scaling efficiency at R ranks is
images/s(R) / (R x images/s(1)). The configuration is D (the default flags) and any ``--extra`` ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from ldm.benchmark.runs import Config, child_env, run_child, tail

FIELDS = ["config", "flags", "ranks", "repeat", "status", "images", "seconds", "images_per_s", "process_s"]
TABLE_FIELDS = ["config", "ranks", "runs", "images", "mean_s", "images_per_s", "speedup", "efficiency",
                "process_mean_s"]


def parse_ranks(text: str) -> list[int]:
    """'8' -> 1..8; '1,2,4' -> those; ValueError on anything else."""
    values = [int(v) for v in text.split(",")]
    ranks = list(range(1, values[0] + 1)) if len(values) == 1 else sorted(set(values))
    if not ranks or min(ranks) < 1:
        raise ValueError(text)
    return ranks


def command(cfg: Config, opt: argparse.Namespace, config: str, ckpt: str, ranks: int, batch: int, dtype: str,
            outdir: str, time_file: str) -> list[str]:
    """The torchrun command of one run."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "ldm.apps.txt2img", "--plms", "--config", config, "--ckpt", ckpt, "--prompt", opt.prompt,
            "--seed", str(opt.seed), "--n_iter", str(opt.n_iter), "--n_samples", str(batch), "--steps",
            str(opt.steps), "--H", str(opt.H), "--W", str(opt.W), "--skip_first", "--time_file", time_file,
            "--dtype", dtype, "--precision", "full", "--outdir", outdir,
            *(["--device", opt.device] if opt.device else []), *cfg.flags]


def run_one(cfg: Config, opt: argparse.Namespace, config: str, ckpt: str, ranks: int, rep: int, batch: int,
            dtype: str, scratch_root: str, logs: str) -> dict:
    """One torchrun job -> a CSV row."""
    scratch = tempfile.mkdtemp(dir=scratch_root)
    outdir, time_file = os.path.join(scratch, "out"), os.path.join(scratch, "time.txt")
    env = child_env(opt)
    if opt.fresh_inductor_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")  # shared by the job's ranks
    log = os.path.join(logs, f"throughput-{cfg.key}-r{ranks}-{rep}.log")
    code, wall = run_child(command(cfg, opt, config, ckpt, ranks, batch, dtype, outdir, time_file), log, opt, env)
    row = {"config": cfg.key, "flags": " ".join(cfg.flags), "ranks": ranks, "repeat": rep,
           "process_s": round(wall, 3)}
    samples = os.path.join(outdir, "samples")
    row["images"] = len([f for f in os.listdir(samples) if f.endswith(".png")]) if os.path.isdir(samples) else 0
    if code != 0 or not os.path.isfile(time_file):
        row["status"] = f"failed (exit {code}): {tail(log)}"
        return row
    with open(time_file, encoding="utf-8") as f:
        seconds = float(f.read())
    row.update(status="ok", seconds=seconds, images_per_s=row["images"] / seconds)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per configuration and rank count: mean timed seconds, images/s, speed-up and efficiency against 1 rank."""
    out = []
    for key in dict.fromkeys(r["config"] for r in rows):
        base = None
        for ranks in sorted({r["ranks"] for r in rows if r["config"] == key}):
            ok = [r for r in rows if r["config"] == key and r["ranks"] == ranks and r["status"] == "ok"]
            if not ok:
                continue
            mean_s = statistics.mean(r["seconds"] for r in ok)
            ips = ok[0]["images"] / mean_s
            base = ips if ranks == 1 else base
            out.append({"config": key, "ranks": ranks, "runs": len(ok), "images": ok[0]["images"], "mean_s": mean_s,
                        "images_per_s": ips, "speedup": ips / base if base else None,
                        "efficiency": ips / (ranks * base) if base else None,
                        "process_mean_s": statistics.mean(r["process_s"] for r in ok)})
    return out


def markdown(table: list[dict], header: list[str], notes: list[str]) -> str:
    """The throughput table, in the style of the benchmark's other tables."""
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)
    lines = header + ["", "| config | ranks | images | mean s | images/s | speed-up | scaling efficiency | process s |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {t['config']} | {t['ranks']} | {t['images']} | {fmt(t['mean_s'], '.3f')} | "
              f"{fmt(t['images_per_s'], '.3f')} | {fmt(t['speedup'], '.2f')}x | {fmt(t['efficiency'], '.0%')} | "
              f"{fmt(t['process_mean_s'], '.1f')} |" for t in table]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(opt: argparse.Namespace, argv: list[str], configs: list[Config], config: str, ckpt: str, model_name: str,
         dtype: str) -> int:
    """Run every configuration at every rank count, --repeats times (at least once); write NAME-throughput.csv
    and NAME-throughput.md into --outdir and print the table."""
    import shlex

    from ldm.benchmark import report
    from ldm.fileio import write_text
    ranks_list, batch = opt.throughput, int(opt.batch.split(",")[0])
    base = os.path.join(opt.outdir, opt.name)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-throughput-") as scratch:
        logs = base + "-logs" if opt.keep_logs else os.path.join(scratch, "logs")
        os.makedirs(logs, exist_ok=True)
        for rep in range(max(1, opt.repeats)):
            for cfg in configs:
                for ranks in ranks_list:
                    rows.append(run_one(cfg, opt, config, ckpt, ranks, rep, batch, dtype, scratch, logs))
                    r = rows[-1]
                    print(f"[throughput {cfg.key}, {ranks} rank(s), run {rep + 1}] " + (
                        f"{r['images']} images, {r['seconds']:.3f}s timed, {r['images_per_s']:.3f} images/s"
                        if r["status"] == "ok" else r["status"]), file=sys.stderr, flush=True)
    table = summarize(rows)
    header = [f"## Throughput: {model_name}, {opt.H}x{opt.W}, {opt.steps} PLMS steps, {opt.n_iter} batches of "
              f"{batch}, {dtype}, 1 to {max(ranks_list)} ranks", "",
              "Command: `ldm-benchmark " + " ".join(shlex.quote(a) for a in argv) + "`"]
    notes = ["each run is one `torchrun --standalone` job of txt2img; 'mean s' is the job's timed seconds (per round "
             "of batches, the slowest rank's sampling and decoding, after one warm-up batch per rank), "
             "'process s' the whole job (start, load, warm-up, PNGs)",
             "scaling efficiency = images/s at R ranks / (R x images/s at 1 rank)"]
    failed = [r for r in rows if r["status"] != "ok"]
    notes += [f"{len(failed)} run(s) failed, e.g. {failed[0]['ranks']} rank(s): {failed[0]['status']}"] if failed else []
    text = markdown(table, header, notes)
    report.write_csv(base + "-throughput.csv", rows, FIELDS)
    write_text(base + "-throughput.md", text + "\n")
    print(text)
    return 1 if failed else 0
