"""The ``ssmkit`` command (also ``python -m ssmkit``): train, generate, eval, bench, info, convert,
serve.

    ssmkit train --preset byte-small --out runs/demo --time 5          # stdlib corpus, 5 minutes
    ssmkit train --out runs/demo --resume --steps 5000                 # continue (here: further)
    ssmkit generate --checkpoint runs/demo --prompt "def " --max-new-tokens 200
    ssmkit eval text --checkpoint runs/demo --data some/folder      # bits per byte (also: ssmkit eval --checkpoint)
    ssmkit eval selective-copying --smoke                            # a synthetic task; `ssmkit eval --help` lists them
    ssmkit bench NAME                                                # `ssmkit bench --help` lists them
    ssmkit info --preset mamba-130m
    ssmkit convert runs/demo/model hf_folder --to transformers
    ssmkit serve --checkpoint runs/demo --port 8000                  # HTTP API on 127.0.0.1

Any config field can be set with ``--model.<field>``, ``--train.<field>`` or ``--data.<field>``
(``ssmkit train --help`` lists them with their docs).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ssmkit.cli_ranges import bound_numbers
from ssmkit.data.config import DataConfig
from ssmkit.train.config import TrainConfig
from ssmkit.train.errors import TrainingError
from ssmkit.train.options import (
    UsageError,
    apply_overrides,
    describe_type,
    flat_fields,
    simple_from_dict,
)

SECTIONS = ("model", "train", "data")


def _section_classes() -> dict[str, type]:
    from ssmkit.models import ModelConfig

    return {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssmkit", description="State space sequence models: train, run, inspect.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", allow_abbrev=False,
                           help="train a model (default data: the Python standard library's source)",
                           usage="ssmkit train [--preset NAME] [--data PATH ...] --out DIR [--steps N | --time MINUTES]"
                                 " [--resume] [--model.KEY VALUE ...] [--train.KEY VALUE ...] [--data.KEY VALUE ...]",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Under torchrun every process runs this same command (DDP by default, "
                                  "--train.parallel fsdp for FSDP2).")
    train.add_argument("--preset", help="model preset (default byte-small); see `ssmkit info --list`")
    train.add_argument("--data", nargs="+", metavar="PATH", help="files or folders to train on")
    train.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoints, metrics, plot, model)")
    group = train.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, metavar="N", help="optimiser steps (= --train.steps)")
    group.add_argument("--time", type=float, metavar="MINUTES", help="train for this long (= --train.time_minutes)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    for section, cls in _section_classes().items():
        options = train.add_argument_group(f"--{section}.* options")
        for key, (tp, default, doc) in flat_fields(cls).items():
            shown = "from the preset" if section == "model" else repr(default)
            options.add_argument(f"--{section}.{key}", dest=f"{section}.{key}", metavar=describe_type(tp),
                                 default=argparse.SUPPRESS, help=f"{doc} (default: {shown})".replace("%", "%%"))

    gen = sub.add_parser("generate", allow_abbrev=False, help="stream a continuation of a prompt to stdout")
    gen.add_argument("--checkpoint", required=True, metavar="DIR|ID",
                     help="model folder, training run folder, or Hugging Face Hub id (org/name)")
    _add_tokenizer_argument(gen)
    gen.add_argument("--ids", action="store_true",
                     help="--prompt is token ids (separated by spaces) and the output is token ids; no tokenizer "
                          "is needed")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    gen.add_argument("--top-p", type=float, default=0.95, metavar="P", help="1 = off")
    gen.add_argument("--seed", type=int, default=None, metavar="S")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda")
    _add_dtype_argument(gen)

    _add_experiments(sub, "eval", "run an evaluation task: bits per byte of a model on text (`text`), synthetic tasks")
    _add_experiments(sub, "bench", "run a benchmark (speed, memory, scaling)")

    info = sub.add_parser("info", allow_abbrev=False,
                          help="config, parameters, cache size and FLOPs per token of a model")
    what = info.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="DIR|ID", help="model folder or Hugging Face Hub id (org/name)")
    what.add_argument("--preset", metavar="NAME")
    what.add_argument("--list", action="store_true", help="list the presets")
    info.add_argument("--context", type=int, default=None, metavar="N",
                      help="also report the cache bytes of one sequence after N tokens (attention layers grow)")

    conv = sub.add_parser("convert", allow_abbrev=False,
                          help="convert a checkpoint between ssmkit and transformers formats")
    conv.add_argument("src", metavar="SRC", help="ssmkit or transformers model folder (or a training run folder, "
                                                 "or a Hugging Face Hub id org/name)")
    conv.add_argument("dst", metavar="DST", help="new folder to write")
    conv.add_argument("--to", required=True, choices=("transformers", "ssmkit", "gguf"),
                      help="gguf: DST is a llama.cpp file (Mamba, Mamba-2; see ssmkit.models.formats.gguf)")
    conv.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                      help="with --to gguf: storage of the 2-D weights (default f32)")

    from ssmkit.serve.options import add_serve_arguments

    serve = sub.add_parser("serve", allow_abbrev=False,
                           help="HTTP server: completions (streamed or not) and stateful sessions")
    add_serve_arguments(serve)
    _add_tokenizer_argument(serve)
    _add_dtype_argument(serve, "Saved sessions load into either.")
    bound_numbers(parser)
    _add_revision_arguments(parser)
    return parser


def _add_tokenizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", metavar="FILE", default=None,
                        help="tokenizer.json to use (or a folder with one), for checkpoints that have none")


def _add_revision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--revision`` for every command that names a checkpoint (``--checkpoint``, or convert's SRC)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_revision_arguments(sub)
    dests = {a.dest for a in parser._actions}
    if ("checkpoint" in dests or "src" in dests) and "revision" not in dests:
        parser.add_argument("--revision", default=None, metavar="REV",
                            help="branch, tag or commit of a Hugging Face Hub checkpoint (default: main)")


def _add_dtype_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--dtype`` of the commands that load a model to run it (:func:`ssmkit.models.loading.load_model`)."""
    from ssmkit.models.loading import DTYPES

    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype (SSM states stay float32): auto = bfloat16 on a GPU, float32 on a "
                             "CPU; bfloat16 roughly doubles CPU decode (half the bytes per token) on CPUs with "
                             "native bf16 (AVX512-BF16, AMX); int8 = float32 with weight-only int8 mixer "
                             "projections (LanguageModel.quantize). " + note)


def _add_experiments(sub: argparse._SubParsersAction, kind: str, help: str) -> None:
    """``ssmkit eval TASK`` / ``ssmkit bench NAME``: one subparser per registered entry (ssmkit.evals)."""
    from ssmkit.evals import discover, entries

    discover()
    parser = sub.add_parser(kind, allow_abbrev=False, help=help, description=help)
    found = entries(kind)
    names = parser.add_subparsers(dest="task", metavar="TASK" if kind == "eval" else "NAME", required=True)
    for name, entry in found.items():
        # "resolve": an entry may redefine a common option (its own --device choices, say).
        p = names.add_parser(name, allow_abbrev=False, help=entry.help, description=entry.help,
                             conflict_handler="resolve")
        p.add_argument("--out", metavar="DIR", default=None, help=f"folder for result.json and plots "
                                                                  f"(default: runs/{kind}/{name})")
        p.add_argument("--smoke", action="store_true", help="a few steps on CPU sizes: checks the machinery")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
        entry.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # The older form `ssmkit eval --checkpoint DIR ...` is the task `text`, printing only.
    legacy_eval = len(argv) > 1 and argv[0] == "eval" and argv[1].startswith("-") and argv[1] not in ("-h", "--help")
    if legacy_eval:
        argv.insert(1, "text")
    args, unknown = parser.parse_known_args(argv)
    args.print_only = legacy_eval and args.out is None
    where = " ".join(filter(None, (args.command, getattr(args, "task", None))))
    try:
        if unknown:
            raise UsageError(_unknown_message(parser, args, unknown))
        commands = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_experiment, "bench": cmd_experiment,
                    "info": cmd_info, "convert": cmd_convert, "serve": cmd_serve}
        return commands[args.command](args) or 0
    except UsageError as e:
        _subparser(parser, args).print_usage(sys.stderr)
        print(f"ssmkit {where}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError, TrainingError) as e:
        # Expected failures (missing files, bad configs or checkpoints, a missing optional package, a
        # diverged run) get one line; anything else is a bug and keeps its traceback.
        print(f"ssmkit {where}: error: {e}", file=sys.stderr)
        return 1


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command (of the task, for eval and bench)."""
    found = parser
    for name in (args.command, getattr(args, "task", None)):
        if name is None:
            break
        found = next(a for a in found._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return found


def _unknown_message(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> str:
    sub = _subparser(parser, args)
    command = " ".join(filter(None, (args.command, getattr(args, "task", None))))
    known = [s for a in sub._actions for s in a.option_strings]
    flag = next((u.split("=")[0] for u in unknown if u.startswith("-")), unknown[0])
    close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see `ssmkit {command} --help`"
    return f"unrecognized argument {flag!r}{hint}"


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ssmkit.models import ModelConfig
    from ssmkit.models.size import check_model_size
    from ssmkit.train import RUN_FILE, Trainer
    from ssmkit.train.checkpoint import read_run_file

    overrides: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            overrides[section][key] = value
    if args.steps is not None:
        overrides["train"].update(steps=str(args.steps), time_minutes="0")
    if args.time is not None:
        # > 0 by its type: time_minutes 0 means "stop after --steps", which `--time 0` must not silently become.
        overrides["train"]["time_minutes"] = str(args.time)
    if args.data:
        overrides["data"]["paths"] = " ".join(args.data)
    out = Path(args.out)
    saved = None
    if args.resume:
        try:
            saved = read_run_file(out / RUN_FILE)
        except FileNotFoundError:
            raise FileNotFoundError(f"--resume: {out / RUN_FILE} not found; is {out} a training run folder?") from None
        except ValueError as e:
            raise ValueError(f"--resume: {e}") from None
    try:
        data_dict = apply_overrides(saved["data"] if saved else asdict(DataConfig()), DataConfig, "data",
                                    overrides["data"])
        train_dict = apply_overrides(saved["train"] if saved else asdict(TrainConfig()), TrainConfig, "train",
                                     overrides["train"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    # Absolute paths, so that a resumed run finds its data from any working directory.
    data_dict["paths"] = [str(Path(p).expanduser().resolve()) for p in data_dict["paths"]]
    if data_dict["tokenizer"]:
        data_dict["tokenizer"] = str(Path(data_dict["tokenizer"]).expanduser().resolve())
    data_config = simple_from_dict(DataConfig, data_dict, "data config")
    train_config = simple_from_dict(TrainConfig, train_dict, "train config")
    model_dict = saved["model"] if saved else None
    if not saved or args.preset or overrides["model"]:
        model_dict = _model_dict(args.preset, overrides["model"], data_config)
        if saved and model_dict != saved["model"]:
            changed = sorted(k for k in model_dict if model_dict[k] != saved["model"].get(k))
            raise UsageError(f"--resume continues the saved model, but --preset/--model.* change {', '.join(changed)}")
    model_config = ModelConfig.from_dict(model_dict)
    # Before reading any data: a model too big for this machine is refused in a second, not after tokenizing.
    check_model_size(model_config, device="cuda" if train_config.device in ("auto", "cuda") and
                     torch.cuda.is_available() else "cpu", source="the model config (--preset, --model.*)")
    Trainer(model_config, train_config, data_config, out, resume=args.resume).fit()
    return 0


def _model_dict(preset: str | None, overrides: dict[str, str], data_config: DataConfig) -> dict[str, Any]:
    """The preset's config with ``--model.*`` overrides; vocab_size fitted to the tokenizer unless given."""
    from ssmkit.data.tokenizer import build_tokenizer
    from ssmkit.models import ModelConfig, get_preset

    try:
        model_dict = apply_overrides(get_preset(preset or "byte-small").to_dict(), ModelConfig, "model", overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    needed = build_tokenizer(data_config.tokenizer).vocab_size
    if "vocab_size" not in overrides:
        model_dict["vocab_size"] = needed
    elif model_dict["vocab_size"] < needed:
        raise UsageError(f"--model.vocab_size {model_dict['vocab_size']} is smaller than the tokenizer's {needed}")
    try:
        return ModelConfig.from_dict(model_dict).to_dict()
    except ValueError as e:  # a --model.* value out of its range
        raise UsageError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    if args.ids:
        return _generate_ids(args)
    from ssmkit.io.files import read_text

    text = args.prompt
    if args.prompt_file:
        try:
            text = read_text(args.prompt_file, "record")  # size-checked before reading
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
    from ssmkit.models.loading import load_model

    model, tokenizer, _ = load_model(args.checkpoint, args.device, args.dtype, revision=args.revision,
                                     tokenizer=args.tokenizer)
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)
    if not ids:
        raise UsageError("this model's tokenizer has no start-of-document token: give a non-empty --prompt")
    if not args.prompt_file:
        sys.stdout.write(text)
    decoder = tokenizer.stream_decoder()
    for token in model.stream([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, eos_token_id=tokenizer.eos_id, seed=args.seed):
        t = int(token[0])
        if t == tokenizer.eos_id:
            break
        sys.stdout.write(decoder.push(t))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    return 0


def _generate_ids(args: argparse.Namespace) -> int:
    """``generate --ids``: the prompt is token ids, the output the new ids; no tokenizer is read."""
    if args.prompt_file:
        raise UsageError("--ids takes the prompt's token ids from --prompt")
    try:
        ids = [int(t) for t in args.prompt.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--ids: --prompt must be token ids separated by spaces, got {args.prompt[:80]!r}") from None
    from ssmkit.models.loading import load_model

    model, _, _ = load_model(args.checkpoint, args.device, args.dtype, revision=args.revision, need_tokenizer=False)
    vocab = model.config.vocab_size
    if not ids or not all(0 <= i < vocab for i in ids):
        raise UsageError(f"--ids: --prompt must hold at least one token id, each in [0, {vocab})")
    for token in model.stream([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed):
        sys.stdout.write(f"{int(token[0])} ")
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """``ssmkit eval TASK`` / ``ssmkit bench NAME``: run the registered entry into its --out folder."""
    from ssmkit.evals import entries

    entry = entries(args.command)[args.task]
    out = None if args.print_only else Path(args.out or Path("runs") / args.command / args.task)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    entry.run(args, out)
    if out is not None:
        print(f"wrote {out / 'result.json'} and plots")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ssmkit.models import LanguageModel, get_preset, list_presets
    from ssmkit.models.loading import load_model

    if args.list:
        for name in list_presets():
            print(f"{name:16s} {get_preset(name).n_layer} layers, d_model {get_preset(name).d_model}")
        return 0
    if args.preset:
        # A preset is built on the meta device: shapes without memory, so a 52B config costs nothing.
        config, label = get_preset(args.preset), f"preset {args.preset}"
        model = LanguageModel(config, device="meta")
    else:
        model, _, folder = load_model(args.checkpoint, "cpu", revision=args.revision, need_tokenizer=False)
        config, label = model.config, str(folder)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.embedding.weight.numel()
    cache = model.cache_nbytes(1)
    length = 256
    flops = model.flops_per_token(length)
    print(f"{label}\n{config.to_json()}")
    print(f"parameters: {n_params:,} ({n_params - n_embed:,} without the embedding)")
    grows = cache != model.cache_nbytes(1 << 20)
    print(f"cache for one sequence: {cache:,} bytes " + ("(grows with full-attention layers)" if grows
                                                         else "(the same at any length)"))
    if args.context is not None:
        print(f"cache for one sequence at {args.context:,} tokens: {model.cache_nbytes(args.context):,} bytes")
    print(f"FLOPs per token, forward: {flops / 1e6:,.1f} M (matrix products, convolutions and scans at length "
          f"{length}, from the layer registry's formulas); training ~3x that")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    from ssmkit.models import LanguageModel
    from ssmkit.models.loading import resolve_model_dir

    dst = Path(args.dst)
    if args.to == "gguf":
        from ssmkit.models.formats.gguf import convert_to_gguf

        return convert_to_gguf(resolve_model_dir(args.src, args.revision), dst, args.outtype)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    src = resolve_model_dir(args.src, args.revision)
    model = LanguageModel.from_pretrained(src)
    model.save_pretrained(dst, format=args.to)
    # ssmkit_tokenizer.json goes into transformers folders too (transformers ignores it): without it a
    # byte model's export would have no tokenizer at all.
    for name in ("tokenizer.json", "ssmkit_tokenizer.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    print(f"wrote {dst} ({args.to} format)")
    return 0


def _model_name(checkpoint: str) -> str:
    """The name the server answers to: a hub id as it is, else the checkpoint folder's name."""
    from ssmkit.io.hub import is_hub_id

    local = Path(checkpoint).expanduser()
    return checkpoint if is_hub_id(checkpoint) and not local.exists() else local.resolve().name


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ssmkit.serve.options import options_from_args
        from ssmkit.serve.server import serve
    except ImportError as e:
        raise UsageError(f"ssmkit serve needs the serve extra: pip install 'ssmkit[serve]' ({e})") from None
    from ssmkit.models.loading import load_model

    model, tokenizer, folder = load_model(args.checkpoint, args.device, args.dtype, revision=args.revision,
                                          tokenizer=args.tokenizer)
    serve(model, tokenizer, folder, options_from_args(args, _model_name(args.checkpoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
