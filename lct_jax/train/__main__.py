r"""Entry point: ``python -m lct_jax.train --config=configs/<stage>.py:size=7b|1.5b|0.5b|tiny --workdir=DIR``.

Single fields: ``--config.num_steps=200 --config.init_from=ckpt/qwen2_7b``. Re-running the same command resumes
from the newest checkpoint in ``DIR/checkpoints`` that verifies (``--config.resume_step=N`` picks one). On a
multi-host run every process runs the same command (``launch/up.sh`` does that on a TPU slice);
``--distributed=auto`` connects them where JAX detects the cluster, explicit
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` anywhere else
(see :mod:`lct_jax.train.distributed`). A failure the user can fix (a mistyped ``--config.`` field, another
stage's workdir, data with no usable record, a full disk, a bad distributed setting) is one ``error: ...`` line and
exit code 2 (``--debug`` or ``LCT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lct_jax.cli import report_errors, skip_absent_tpu
from lct_jax.train import distributed
from lct_jax.train.loop import NonFiniteError
from lct_jax.train.run import parse_flags, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file: configs/<stage>.py:size=...")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and config.json go here")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES), distributed.FLAG_HELP["distributed"]
)
# strings, validated by lct_jax.train.distributed like their environment variables (one-line errors)
_SETTINGS = [flags.DEFINE_string(key, None, distributed.FLAG_HELP[key]) for key in distributed.ENV_VARS]
_DIST_TIMEOUT = flags.DEFINE_float(
    "distributed_timeout", distributed.TIMEOUT_S, distributed.FLAG_HELP["distributed_timeout"]
)
flags.DEFINE_bool("debug", False, "show the traceback of every failure (also: LCT_DEBUG=1)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    skip_absent_tpu()
    given = {f.name: f.value for f in _SETTINGS}
    print(distributed.start(_DISTRIBUTED.value, distributed.settings(given), _DIST_TIMEOUT.value))
    config = _CONFIG.value
    print(
        f"lct_jax.train: stage={config.stage} size={config.size} workdir={_WORKDIR.value} "
        f"devices={jax.device_count()} processes={jax.process_count()}"
    )
    try:
        result = run(config, _WORKDIR.value)
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    last = result.history[-1] if result.history else {}
    print(
        f"{result.status} at step {int(result.state.step)}; last loss {last.get('loss', float('nan')):.4f}; "
        f"checkpoints in {_WORKDIR.value}/checkpoints, TensorBoard events in {_WORKDIR.value}/tb"
    )
    return 0


if __name__ == "__main__":
    app.run(lambda argv: report_errors(lambda: main(argv), sys.argv), flags_parser=parse_flags)
