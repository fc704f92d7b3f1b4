"""Command line: `python -m pipeline COMMAND ...`, calling the same functions the DAG calls."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module, help). Module `pipeline.<module>` provides `cli_<command>(args, settings)`
# and `add_<command>_arguments(parser)`, the latter in `pipeline.<ARGUMENTS[command]>` where one
# is named (command names with '-' use '_' in the function names).
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("preflight", "check that MySQL, S3 and MLflow are reachable and usable"),
    "migrate": ("catalog", "apply pending MySQL schema migrations"),
    "upload": ("upload", "copy a local <split>/<label>/<file> tree into the bucket"),
    "demo-data": ("demo_data", "render the demo dataset (scikit-learn digits) to image files"),
    "scan": ("catalog", "catalog the bucket into MySQL and print the dataset version"),
    "train": ("train", "train ResNet18 on a dataset version and register it in MLflow"),
    "promote": ("registry", "run the promotion gate for a model version, or roll back"),
    "review": ("registry", "approve or reject a promotion awaiting approval"),
    "score": ("score", "score images with a model version and write predictions to MySQL"),
    "report": ("report", "print the evaluation of the champion (or a model version)"),
    "check-drift": ("drift", "compare a scoring run's images with the version's val reference"),
}
# Torch-free homes of a command's flags: `train --help` and bad flags answer without torch.
ARGUMENTS: dict[str, str] = {"train": "train_plan"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (the others may need torch)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("--env-file", help="env file to read (default: the repo's .env)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--model-name",
        help="registered MLflow model of this dataset scope (default: MODEL_NAME); the DAGs'"
        " model_name param",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            module = importlib.import_module(f"pipeline.{ARGUMENTS.get(name, module_name)}")
            getattr(module, f"add_{name.replace('-', '_')}_arguments")(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.config import ConfigError, load_settings

    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.model_name:
        import re
        from dataclasses import replace

        from pipeline.params import MODEL_NAME_PATTERN

        if not re.fullmatch(MODEL_NAME_PATTERN, args.model_name):
            print(
                f"--model-name {args.model_name!r}: expected {MODEL_NAME_PATTERN}", file=sys.stderr
            )
            return 2
        settings = replace(settings, model_name=args.model_name)
    module = importlib.import_module(f"pipeline.{args._module}")
    try:
        return int(getattr(module, f"cli_{args.command.replace('-', '_')}")(args, settings) or 0)
    except (ConnectionError, ValueError, LookupError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
