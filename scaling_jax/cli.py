"""``scaling-jax`` command line: train, info.

User errors (``UserError``) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from scaling_jax.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from scaling_jax.config import load_config
    from scaling_jax.train.loop import train

    config = load_config(args.config, args.overrides)
    summary = train(config)
    if "val_bpb" in summary:
        print(f"final validation: {summary['val_bpb']:.3f} bits/byte (unigram baseline "
              f"{summary['baseline_bpb']:.3f}), {summary['val_loss']:.4f} nats/token; "
              f"{summary['step']} steps, {summary['tokens']:,} tokens in {summary['wall_time']:.1f} s; "
              f"run dir {config.train.run_dir}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import jax

    from scaling_jax.config import load_config
    from scaling_jax.info import describe, format_report

    path = args.config
    if os.path.isdir(path):
        saved = os.path.join(path, "config.yaml")
        if not os.path.isfile(saved):
            raise UserError(f"'{path}' is a directory without config.yaml; pass a config file or a run directory")
        path = saved
    config = load_config(path, args.overrides)
    devices = args.devices or jax.device_count()
    print(format_report(config, describe(config, devices)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a model as a config describes")
    train.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as model.layers=4 train.steps=200")
    train.set_defaults(func=_train)

    info = sub.add_parser("info", help="parameter count, FLOPs/token and memory per device of a config or run")
    info.add_argument("config", help="YAML config or run directory")
    info.add_argument("overrides", nargs="*")
    info.add_argument("--devices", type=int, default=0, help="device count to plan for (default: this machine's)")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra  # key=value after an --option
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
