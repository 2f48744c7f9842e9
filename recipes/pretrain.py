"""Pretrain a LLaMA with a low-rank (or full-rank) optimizer.

    python recipes/pretrain.py                                   # the embedded default: CPU, no network
    lowrank-pretrain                                             # the same entry point, as a console script
    python recipes/pretrain.py --config c4_60m trainer.devices=8 # a reference run
    python recipes/pretrain.py --config default optimizer.lowrank.selector=dominant trainer.max_steps=100

``--config`` takes a path or a bare name under configs/; every other argument is a ``key=value`` override. The
resolved config is printed and saved in ``out_dir``; TensorBoard logs go to ``out_dir/tensorboard`` and checkpoints
to ``out_dir/checkpoints`` (``resume=auto`` continues from ``last.ckpt`` there: a directory with fsdp2's default sharded
checkpoints, a file otherwise). Configuration errors are reported in one paragraph before anything is written (exit 2);
a non-finite loss stops the run before that step's update, keeping the last good checkpoint (exit 3); SIGTERM or
SIGINT save the step's checkpoint at the next optimizer-step boundary and stop (exit 143 / 130; a second Ctrl+C stops
at once).
"""

from __future__ import annotations

import argparse
import sys

from lowrank_recipes.recipes.config import ConfigError, load_run_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="default", help="config path or name under configs/ (default: default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run, resolved = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # lightning, datasets, torchdata: imported only once the config is known to be good
    from lowrank_recipes.callbacks import NonFiniteError, RunStopped
    from lowrank_recipes.recipes.checkpoints import NoUsableCheckpointError
    from lowrank_recipes.recipes.data.file_check import DataContentError
    from lowrank_recipes.recipes.run_lock import RunLockedError
    from lowrank_recipes.recipes.trainer import fit

    try:
        return fit(run, resolved)
    except (RunLockedError, ConfigError, NoUsableCheckpointError) as err:  # another run holds out_dir, a refused
        # change on resume, or resume=auto found only broken checkpoints: nothing was written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataContentError as err:  # a bad record past the pre-flight check: one paragraph, checkpoints kept
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # every rank agreed; the last good checkpoint is untouched
        print(f"error: {err}", file=sys.stderr)
        return 3
    except RunStopped as err:  # SIGTERM / SIGINT: every rank stopped at the same step boundary
        print(f"stopped: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
