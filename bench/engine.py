"""4. Large files through the engine: `ingestd process` (the same engine and line reader as the daemon's
workers, with its durable publish of the output), on tmpfs, warm in the page cache:

* 4.1-4.5 lower-case ASCII, `--mode uppercase`, vs `tr a-z A-Z`, `cat` and bench/baselines/py_blocks.py;
* 4.6-4.7 mixed Unicode text (Latin, accented Latin, Greek, Cyrillic, CJK, emoji), `--mode uppercase`, vs
  bench/baselines/naive_lines.py (`for line in f: out.write(line.upper())`);
* 4.8-4.9 README's routing example (its `routing.toml`, read from README.md) on an application log, vs
  bench/baselines/routing_loop.py, the same regex work by hand.

Every output is checked identical to its baseline's. Peak RSS is VmHWM, sampled every 5 ms.
"""

from __future__ import annotations

import random
import re
import string
import subprocess
from pathlib import Path

from bench.harness import (
    MB,
    PY,
    REPO,
    Rep,
    Table,
    baseline,
    clean_env,
    f_mbs,
    note,
    on_tmpfs,
    ratio,
    same_file,
    text_block,
    timed_run,
    tmpfs_dir,
    write_big,
)

LATIN1 = "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœ"
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
CYRILLIC = "абвгдежзийклмнопрстуфхцчшщъыьэюя"
CJK = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))
EMOJI = "😀😃😄😁😆🙂🚀🌍🔥✨🎉"


def unicode_block(rng: random.Random, size: int) -> bytes:
    """About `size` bytes of UTF-8 lines of words drawn from several scripts, ending with a newline."""
    scripts = [(string.ascii_lowercase, 5), (string.ascii_lowercase + LATIN1, 2), (GREEK, 1), (CYRILLIC, 2),
               (CJK, 1), (EMOJI, 0.3)]
    alphabets, weights = zip(*scripts)
    vocab = ["".join(rng.choices(a, k=rng.randint(2, 9))) for a in rng.choices(alphabets, weights, k=3000)]
    parts, n = [], 0
    while n < size:
        line = (" ".join(rng.choices(vocab, k=rng.randint(3, 16))) + "\n").encode()
        parts.append(line)
        n += len(line)
    return b"".join(parts)


def app_log_block(rng: random.Random, size: int) -> bytes:
    """About `size` bytes of an application log: levels, some ERROR lines, some secrets, some # comments."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(1500)]
    parts, n, i = [], 0, 0
    while n < size:
        r = rng.random()
        msg = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        if r < 0.05:
            line = f"# {msg}\n"
        else:
            level = "ERROR" if r < 0.15 else rng.choice(("INFO", "INFO", "INFO", "DEBUG", "WARN"))
            secret = f" user={rng.choice(words)} password={rng.choice(words)}{i % 997}" if rng.random() < 0.2 else ""
            line = f"2026-11-30T12:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z {level} {msg}{secret}\n"
        parts.append(line.encode())
        n += len(parts[-1])
        i += 1
    return b"".join(parts)


def readme_routing() -> str:
    """The TOML of README's worked routing example, verbatim (so the bench follows the README)."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"A worked example, `routing.toml`:\s*```toml\n(.*?)```", text, re.DOTALL)
    if not m:
        raise RuntimeError("README.md has no routing.toml example (\"A worked example, `routing.toml`:\")")
    return m.group(1)


def ingestd(src: Path, out: Path, *how: str) -> list[str]:
    return [PY, "-m", "ingestd", "process", "--input", str(src), "--output", str(out), *how]


def run(work: Path, t: Table, quick: bool) -> None:
    size, rsize = (50 * MB, 20 * MB) if quick else (200 * MB, 100 * MB)
    reps = 1 if quick else 3
    d = tmpfs_dir(work)
    where = "tmpfs" if on_tmpfs(d) else "disk"
    # An installed ingestd has its bytecode compiled (pip and distribution packages compile at install); this
    # checkout under PYTHONDONTWRITEBYTECODE=1 would compile every ingestd module from source at each start
    # (~25 ms of `ingestd process`'s start-up on this machine kind). Compiled once here into ingestd/__pycache__
    # (ignored by git; a stale file is recompiled in memory, by its mtime).
    env = clean_env()
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "ingestd")], env=env, check=True)
    rss: dict[str, int] = {}

    def timed(key: str, cmd: list[str], runs: dict[str, Rep], nbytes: int, **kw: Path | None) -> None:
        s, r, _ = timed_run(cmd, env=env if cmd[1:3] == ["-m", "ingestd"] else None, cwd=d, **kw)
        runs.setdefault(key, Rep()).add(nbytes / s / MB)
        rss[key] = max(rss.get(key, 0), r)

    # ASCII uppercase
    src = d / "ascii.txt"
    note(f"engine: writing {size // MB} MB of ASCII text in {d}")
    rng = random.Random(5)
    write_big(src, size, [text_block(rng, 1 << 20) for _ in range(8)])
    n = src.stat().st_size
    timed_run(["cat", str(src)])  # warm the page cache
    runs: dict[str, Rep] = {}
    for rep in range(reps):
        note(f"engine: ASCII: ingestd process / tr / cat / python blocks (rep {rep + 1}/{reps})")
        timed("ingestd", ingestd(src, d / "out-ingestd.txt", "--mode", "uppercase"), runs, n)
        timed("tr", ["tr", "a-z", "A-Z"], runs, n, stdin=src, stdout=d / "out-tr.txt")
        timed("cat", ["cat"], runs, n, stdin=src, stdout=d / "out-cat.txt")
        timed("py", [*baseline("py_blocks"), str(src), str(d / "out-py.txt")], runs, n)
        if not same_file(d / "out-ingestd.txt", d / "out-tr.txt"):
            raise RuntimeError("ingestd process output differs from tr a-z A-Z")
        for f in d.glob("out-*"):
            f.unlink()
    start_cmd = [PY, "-m", "ingestd", "process", "--input", "/dev/null", "--output", "-", "--mode", "uppercase"]
    s_start = min(timed_run(start_cmd, env=env, cwd=d)[0] for _ in range(3))
    src.unlink()
    ing = runs["ingestd"]
    t.add("4.1", f"ingestd process --mode uppercase, {n / MB:.0f} MB ASCII ({where})", ing.fmt(f_mbs),
          "tr a-z A-Z", runs["tr"].fmt(f_mbs), ratio(ing.mid, runs["tr"].mid, "higher"),
          mb_per_s=ing, baseline_mb_per_s=runs["tr"], bytes=n)
    t.add("4.2", "", "", "cat", runs["cat"].fmt(f_mbs), ratio(ing.mid, runs["cat"].mid, "higher"),
          baseline_mb_per_s=runs["cat"])
    t.add("4.3", "", "", "python, 1 MiB blocks, bytes.upper", runs["py"].fmt(f_mbs),
          ratio(ing.mid, runs["py"].mid, "higher"), baseline_mb_per_s=runs["py"])
    t.add("4.4", "  peak RSS (VmHWM) of that run", f"{rss['ingestd'] / 1024:.1f} MiB",
          "tr / cat / python blocks",
          f"{rss['tr'] / 1024:.1f} / {rss['cat'] / 1024:.1f} / {rss['py'] / 1024:.1f} MiB",
          rss_bytes=rss["ingestd"] * 1024)
    t.add("4.5", "  of which interpreter start-up (bytecode compiled, best of 3)", f"{s_start * 1e3:.0f} ms",
          seconds=s_start)
    r_tr = ing.mid / runs["tr"].mid
    t.target(">= 1.0x `tr a-z A-Z`, ASCII uppercase, durable publish included", f"{r_tr:.2f}x", r_tr >= 1.0)

    # Mixed Unicode uppercase
    src = d / "unicode.txt"
    note(f"engine: writing {size // MB} MB of mixed Unicode text")
    rng = random.Random(6)
    write_big(src, size, [unicode_block(rng, 1 << 20) for _ in range(8)])
    n = src.stat().st_size
    timed_run(["cat", str(src)])
    runs = {}
    for rep in range(reps):
        note(f"engine: Unicode: ingestd process / naive line loop (rep {rep + 1}/{reps})")
        timed("ingestd-u", ingestd(src, d / "out-ingestd.txt", "--mode", "uppercase"), runs, n)
        timed("naive", [*baseline("naive_lines"), str(src), str(d / "out-naive.txt")], runs, n)
        if not same_file(d / "out-ingestd.txt", d / "out-naive.txt"):
            raise RuntimeError("ingestd process output differs from the naive line loop's (Unicode)")
        for f in d.glob("out-*"):
            f.unlink()
    src.unlink()
    ing = runs["ingestd-u"]
    t.add("4.6", f"ingestd process --mode uppercase, {n / MB:.0f} MB mixed Unicode", ing.fmt(f_mbs),
          "naive `for line in f: out.write(line.upper())`", runs["naive"].fmt(f_mbs),
          ratio(ing.mid, runs["naive"].mid, "higher"), mb_per_s=ing, baseline_mb_per_s=runs["naive"], bytes=n)
    t.add("4.7", "  peak RSS (VmHWM)", f"{rss['ingestd-u'] / 1024:.1f} MiB", "naive line loop",
          f"{rss['naive'] / 1024:.1f} MiB", rss_bytes=rss["ingestd-u"] * 1024)
    r_u = ing.mid / runs["naive"].mid
    t.target(">= 3x the naive line loop, mixed Unicode uppercase", f"{r_u:.2f}x", r_u >= 3)

    # README's routing example
    conf = d / "routing.toml"
    conf.write_text(readme_routing())
    src = d / "app.log"
    note(f"engine: writing a {rsize // MB} MB application log")
    rng = random.Random(8)
    write_big(src, rsize, [app_log_block(rng, 1 << 20) for _ in range(8)])
    n = src.stat().st_size
    timed_run(["cat", str(src)])
    runs = {}
    (d / "out-i").mkdir()
    (d / "out-b").mkdir()
    for rep in range(reps):
        note(f"engine: README routing: ingestd process --config / hand-written regex loop (rep {rep + 1}/{reps})")
        timed("ingestd-r", ingestd(src, d / "out-i" / "app.log", "--config", str(conf)), runs, n)
        timed("loop", [*baseline("routing_loop"), str(src), str(d / "out-b")], runs, n)
        for rel in ("app.log", "errors/app.log"):
            if not same_file(d / "out-i" / rel, d / "out-b" / rel):
                raise RuntimeError(f"README routing: ingestd's {rel} differs from the hand-written loop's")
    routed = (d / "out-i" / "errors" / "app.log").stat().st_size
    src.unlink()
    ing = runs["ingestd-r"]
    t.add("4.8", f"README routing example (retag+redact+drop), {n / MB:.0f} MB log", ing.fmt(f_mbs),
          "hand-written Python regex loop, same work", runs["loop"].fmt(f_mbs),
          ratio(ing.mid, runs["loop"].mid, "higher"), mb_per_s=ing, baseline_mb_per_s=runs["loop"], bytes=n)
    t.add("4.9", "  peak RSS (VmHWM)", f"{rss['ingestd-r'] / 1024:.1f} MiB", "errors/ output",
          f"{routed / MB:.1f} MB", rss_bytes=rss["ingestd-r"] * 1024)
    r_r = ing.mid / runs["loop"].mid
    t.target(">= 1.0x a hand-written regex loop, README routing example", f"{r_r:.2f}x", r_r >= 1.0)
    peak = max(rss["ingestd"], rss["ingestd-u"], rss["ingestd-r"]) / 1024
    t.target("peak RSS < 100 MB for any input (ingestd process, 4.4 / 4.7 / 4.9)", f"{peak:.1f} MiB",
             peak * 1024 * 1024 < 100 * MB)
