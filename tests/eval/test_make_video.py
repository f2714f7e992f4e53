"""``make-video`` writes the procedural movie into a real file that decodes back to the same frames."""

import numpy as np

from lct_jax.data.procedural import procedural_frame
from lct_jax.data.video import probe
from lct_jax.eval.__main__ import main


def test_make_video_writes_the_procedural_frames(tmp_path, capsys):
    out = tmp_path / "movie.mp4"
    argv = ["make-video", "--out", str(out), "--frames", "12", "--fps", "1", "--seed", "2", "--size", "64x36"]
    assert main(argv) == 0
    assert "procedural:seed=2,frames=12,fps=1,size=64x36" in capsys.readouterr().out
    v = probe(out)
    assert (v.num_frames, v.fps, v.size) == (12, 1.0, (64, 36))
    assert v.sample(fps=1).tolist() == list(range(12))
    for k, img in v.frames():
        diff = np.abs(np.asarray(img, np.float32) - np.asarray(procedural_frame(2, k, (64, 36)), np.float32))
        assert diff.mean() < 4, (k, diff.mean())  # H.264 at CRF 18 on flat shapes
    for bad, why in [
        (argv, "exists; pass --overwrite"),
        (
            ["make-video", "--out", str(tmp_path / "m.gif"), "--frames", "2"],
            "the extension picks the container",
        ),
        (
            ["make-video", "--out", str(tmp_path / "m.mp4"), "--frames", "2", "--size", "63x36"],
            "must be even",
        ),
        (["make-video", "--out", str(tmp_path / "no" / "m.mp4"), "--frames", "2"], "does not exist"),
    ]:
        try:
            rc = main(bad)
        except SystemExit as e:  # argparse's type check of --size
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and why in err and err.count("\n") == 1, err
