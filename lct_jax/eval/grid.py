"""A needle-in-a-haystack grid run: cells in order, a resumable results file, a heatmap, TensorBoard events.

Axis alphabet: X the grid's first axis (frames for V-NIAH, tokens for text NIAH), Y depth.

``OUT/results.json`` is rewritten atomically (temp file + rename) after every cell, so a killed run restarted with
the same command skips the cells already there and ends with the same file as an uninterrupted run (nothing
time-dependent is recorded). Its ``config`` must equal the restarted run's, else the run stops with an error
naming the difference. Layout::

    {"format": "lct_jax.niah/1", "task": "vniah", "config": {...what the run was asked...},
     "complete": true, "mean": 0.53, "cells": [{"frames": 200, "depth": 0.0, "score": 0.6, "samples": [...]}, ...]}

At the end: ``OUT/heatmap.png`` (x = X, y = depth %, red → yellow → green, vmin 0 / vmax 1, the mean in the
title, as in the LongVA paper) and, in ``OUT/tb``, every cell's score as a scalar (tag ``<task>/depth_<percent>``,
step X), each X column's mean (``<task>/mean_over_depths``), the overall mean (``<task>/mean``) and the heatmap
as an image summary (``<task>/heatmap``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from lct_jax.eval.cli import EvalError
from lct_jax.train.metrics import EventWriter

FORMAT = "lct_jax.niah/1"
RESULTS, HEATMAP, EVENTS = "results.json", "heatmap.png", "tb"
# LongVA's / the NIAH heatmap colours: red (0) -> yellow -> green (1)
HEATMAP_COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def parse_grid(spec: str, kind: type = float) -> list:
    """``"200:3000:200"`` (inclusive range) or ``"0,0.5,1"`` -> a sorted list of ``kind`` values."""
    try:
        if ":" in spec:
            lo, hi, step = (float(x) for x in spec.split(":"))
            if step <= 0 or hi < lo:
                raise ValueError
            n = int(round((hi - lo) / step))
            values = [lo + i * step for i in range(n + 1) if lo + i * step <= hi + 1e-9 * max(1, abs(hi))]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
        if not values:
            raise ValueError
    except ValueError:
        raise EvalError(f"grid {spec!r}: expected MIN:MAX:STEP (inclusive) or a comma list") from None
    out = sorted({kind(round(v, 6)) if kind is float else kind(round(v)) for v in values})
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _depth_tag(depth: float) -> str:
    return f"depth_{depth * 100:g}"  # percent; TensorBoard tags take no '%'


class GridRun:
    """Results of one grid in ``out``: resumes a previous run with the same ``config``."""

    def __init__(self, out: str | os.PathLike, task: str, x_name: str, config: dict):
        self.out = Path(out)
        self.task, self.x_name = task, x_name
        self.config = json.loads(json.dumps(config))  # plain JSON values, so comparisons are exact
        self.path = self.out / RESULTS
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EvalError(f"--out {self.out}: cannot create it ({e.strerror})") from e
        self.results = {"format": FORMAT, "task": task, "config": self.config, "complete": False, "cells": []}
        if self.path.exists():
            try:
                have = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise EvalError(f"{self.path} is not valid JSON ({e}); delete it to start over") from e
            if have.get("format") != FORMAT or have.get("task") != task:
                raise EvalError(f"{self.path} holds no {task} results; pass another --out")
            old = have.get("config", {})
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            if diff:
                shown = "; ".join(
                    f"{k}: {old.get(k)!r} there vs {self.config.get(k)!r} now" for k in diff[:4]
                )
                raise EvalError(
                    f"{self.path} holds results of a different {task} run ({shown}); pass another --out or "
                    "delete it to start over"
                )
            self.results = have

    def done(self) -> set[tuple]:
        return {(c[self.x_name], c["depth"]) for c in self.results["cells"]}

    def add(self, cell: dict) -> None:
        self.results["cells"].append(cell)
        self._save()

    def _save(self) -> None:
        try:
            _write_atomic(self.path, json.dumps(self.results, indent=1) + "\n")
        except OSError as e:
            raise EvalError(
                f"cannot write {self.path} ({e.strerror}); free space or pass another --out"
            ) from e

    def table(self, xs: Sequence, depths: Sequence[float]) -> np.ndarray:
        """float[Y, X] scores, NaN where a cell is missing."""
        grid = np.full((len(depths), len(xs)), np.nan)
        at = {(c[self.x_name], c["depth"]): c["score"] for c in self.results["cells"]}
        for j, x in enumerate(xs):
            for i, d in enumerate(depths):
                grid[i, j] = at.get((x, d), np.nan)
        return grid

    def run(
        self,
        xs: Sequence,
        depths: Sequence[float],
        score_cell: Callable[[object, float], dict],
        *,
        title: str,
        x_label: str,
        progress: bool = True,
    ) -> dict:
        """Score every missing (x, depth) cell with ``score_cell(x, depth) -> {"score": ..., ...}`` (x outermost:
        one compile per x), then write the heatmap and the events; returns the results dict."""
        # every process keeps its own results.json (identical; all must agree on what is left to score), one
        # process writes the events and the heatmap
        writer = EventWriter(self.out / EVENTS) if jax.process_index() == 0 else None
        done = self.done()
        todo = [(x, d) for x in xs for d in depths if (x, d) not in done]
        bar = tqdm(total=len(xs) * len(depths), initial=len(xs) * len(depths) - len(todo), disable=not progress,
                   desc=self.task, unit="cell")  # fmt: skip
        try:
            for x, d in todo:
                cell = {self.x_name: x, "depth": d, **score_cell(x, d)}
                self.add(cell)
                column = self.table([x], depths)
                if writer is not None:
                    writer.scalars(x, {f"{self.task}/{_depth_tag(d)}": cell["score"]})
                    if not np.isnan(column).any():
                        writer.scalars(x, {f"{self.task}/mean_over_depths": float(column.mean())})
                bar.update(1)
                bar.set_postfix({self.x_name: x, "depth": d, "score": f"{cell['score']:.2f}"})
        finally:
            bar.close()
        grid = self.table(xs, depths)
        self.results["complete"] = True
        self.results["mean"] = float(grid.mean())
        self._save()
        if writer is not None:
            png = heatmap_png(grid, xs, depths, title=f"{title}, mean {grid.mean():.3f}", x_label=x_label)
            (self.out / HEATMAP).write_bytes(png)
            writer.scalars(0, {f"{self.task}/mean": self.results["mean"]})
            writer.images(0, {f"{self.task}/heatmap": png_to_rgb(png)})
            writer.close()
        return self.results


def print_summary(name: str, results: dict, out) -> None:
    """What a finished grid run prints: the mean and where its files are."""
    out = Path(out)
    print(f"{name} mean {results['mean']:.3f} over {len(results['cells'])} cells")
    print(f"results  {out / RESULTS}\nheatmap  {out / HEATMAP}\nevents   {out / EVENTS}")


def heatmap_png(
    grid: np.ndarray, xs: Sequence, depths: Sequence[float], *, title: str, x_label: str
) -> bytes:
    """float[Y, X] scores in [0, 1] -> PNG bytes: x = ``xs``, y = depth % (0 at the top, as in the paper)."""
    # matplotlib costs ~1 s to import and only the end of a run needs it
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import LinearSegmentedColormap  # noqa: PLC0415

    cmap = LinearSegmentedColormap.from_list("niah", HEATMAP_COLORS).with_extremes(
        bad="#d0d0d0"
    )  # missing: grey
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.55 * len(xs) + 2.0), max(3.0, 0.4 * len(depths) + 1.5)), dpi=100
    )
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=45 if len(xs) > 8 else 0)
    ax.set_yticks(range(len(depths)), [f"{d * 100:g}" for d in depths])
    ax.set_xlabel(x_label)
    ax.set_ylabel("depth (%)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_to_rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
