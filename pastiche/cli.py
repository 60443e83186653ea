"""Thin dispatcher: one subcommand per stage, flags derived from the stage's config dataclass.

Stage modules are imported only when their command runs, so ``pastiche --help`` never
imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pastiche import __version__
from pastiche.config import STAGES, add_arguments, build, load_yaml
from pastiche.errors import PasticheError

COMMANDS = {
    "prepare": ("pastiche.prepare", "Author corpus -> prompt/completion train/eval/test splits.",
                "pastiche prepare book.csv --out data/book"),
    "train": ("pastiche.train", "LoRA fine-tune of a base model on prepared splits.",
              "pastiche train data/book --epochs 3"),
    "evaluate": ("pastiche.evaluate", "Held-out perplexity and style report: does it write like the author?",
                 "pastiche evaluate runs/book-01"),
    "generate": ("pastiche.generate", "Write new pieces with a trained run or an export.",
                 "pastiche generate runs/book-01 --title 'The Glass Harbour'"),
    "export": ("pastiche.export", "PEFT adapter, GGUF adapter, merged GGUF and Ollama Modelfiles, verified.",
               "pastiche export runs/book-01"),
    "serve": ("pastiche.serve", "Web page plus OpenAI- and Ollama-compatible API.",
              "pastiche serve runs/book-01/export --port 8000"),
    "run": ("pastiche.run", "The whole road: prepare, train, evaluate, export, one new sample.",
            "pastiche run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pastiche",
        description="Turn a writer's body of work into a local model that writes new pieces in that voice.",
    )
    parser.add_argument("--version", action="version", version=f"pastiche {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary, example) in COMMANDS.items():
        stage = sub.add_parser(name, help=summary, description=f"{summary}\n\nExample:\n  {example}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(stage, STAGES[name])
        if name != "run":
            stage.add_argument("--config", dest="config_file", default=argparse.SUPPRESS,
                               help=f"YAML file; its '{name}:' section sets options (flags win).")
    runs = sub.add_parser("runs", help="List runs (iterations) with their key metrics.")
    runs.add_argument("runs_dir", nargs="?", default="runs", help="Folder holding the runs (default: runs).")
    return parser


def stage_config(command: str, given: dict) -> object:
    """Dataclass default <- config file section <- command-line flags."""
    file_layer = {}
    if "config_file" in given:
        file_layer = load_yaml(given.pop("config_file")).get(command) or {}
    return build(STAGES[command], file_layer, given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command is None:
        parser.print_help()
        return 0
    try:
        if command == "runs":
            from pastiche.evaluate import list_runs

            return list_runs(args["runs_dir"])
        cfg = stage_config(command, args)
        module = importlib.import_module(COMMANDS[command][0])
        return module.main(cfg) or 0
    except PasticheError as exc:
        print(f"pastiche {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\npastiche {command}: interrupted.", file=sys.stderr)
        return 130
