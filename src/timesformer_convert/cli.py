"""Command line: ``timesformer-convert {convert,list,rules,selfcheck}``.

Every error a user can cause is printed as one line on stderr starting with ``error:``, the exit status is non-zero,
and no output folder is left behind. ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .errors import CheckpointError, ConversionError, Terminated

logger = logging.getLogger("timesformer_convert")

EXIT_USAGE = 2
EXIT_FAILED = 1
MAX_TIMEOUT_SECONDS = 86400

# A source of the form scheme://..., which as a path would be looked for under a folder named "scheme:".
_FOREIGN_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    if value > MAX_TIMEOUT_SECONDS:  # also infinity, which the socket layer cannot turn into a deadline
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TIMEOUT_SECONDS} seconds, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``error:`` line and exit status 2, instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def _text(text: str) -> str:
    """A file or URL argument that must not be blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a file or a URL")
    return text


def _path(text: str) -> Path:
    """A path argument; an empty one (an unset shell variable, say) would otherwise mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="timesformer-convert",
        description="Convert original TimeSformer checkpoints to Hugging Face transformers and verify them.",
    )
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress messages")
    # The same switches after the command name; SUPPRESS keeps the top-level value when they are not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show progress")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", parents=[common], help="convert one checkpoint file to a transformers folder"
    )
    convert.add_argument(
        "source",
        nargs="?",
        type=_text,
        help="original checkpoint: a file (.pyth / .pth) or an http(s) URL; leave it out to fetch --variant's own",
    )
    convert.add_argument("--out", required=True, type=_path, help="output folder (must not exist unless --overwrite)")
    convert.add_argument("--variant", help="declared variant; its shape is checked against the checkpoint's")
    convert.add_argument("--num-attention-heads", type=_positive, help="heads per layer (default: hidden size / 64)")
    convert.add_argument("--num-frames", type=_positive, help="frame count for space-only models (no time embedding)")
    convert.add_argument("--labels", type=_path, help='JSON label map {"0": "name", ...} to put in config.json')
    convert.add_argument(
        "--fetch-labels", action="store_true", help="download the variant's label map from the Hugging Face hub"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    downloads = convert.add_argument_group("downloads")
    downloads.add_argument(
        "--checkpoint-dir",
        type=_path,
        help="folder of downloaded original checkpoints, looked in before downloading (default: "
        "$TIMESFORMER_CHECKPOINT_DIR)",
    )
    downloads.add_argument(
        "--checksums",
        type=_path,
        help="checksums lock file (default: $TIMESFORMER_CHECKSUMS, else checksums.json of the source checkout)",
    )
    downloads.add_argument(
        "--record-checksums",
        action="store_true",
        help="pin the size and sha256 of the fetched checkpoint in the checksums lock file",
    )
    downloads.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        help="seconds to wait for data before a download is abandoned (default 60)",
    )

    listing = commands.add_parser("list", parents=[common], help="list the released variants")
    listing.add_argument("--json", action="store_true", help="print a JSON list")

    rules = commands.add_parser("rules", parents=[common], help="print the rename rule table")
    rules.add_argument("--json", action="store_true", help="print a JSON list")

    cache = commands.add_parser("cache", parents=[common], help="show or empty the cache folder")
    cache.add_argument(
        "action", choices=("info", "clean"), help="info: location and size; clean: delete what the converter cached"
    )

    selfcheck = commands.add_parser(
        "selfcheck",
        parents=[common],
        help="build synthetic checkpoints of the released variants, convert and verify them (offline)",
    )
    selfcheck.add_argument("--variant", action="append", help="check only this variant (repeatable)")
    selfcheck.add_argument(
        "--forward-blocks",
        type=_positive,
        default=1,
        help="blocks in the model used for the forward check (default 1)",
    )
    selfcheck.add_argument(
        "--work-dir",
        type=_path,
        help="keep checkpoints and conversions here, about 1 GB a variant (default: temporary)",
    )
    selfcheck.add_argument("--json", type=_path, help="also write the table as JSON to this file")
    return parser


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(error).__name__


def _command_list(args) -> int:
    from .variants import VARIANTS

    if args.json:
        print(json.dumps([variant.as_dict() for variant in VARIANTS.values()], indent=2))
        return 0
    print(f"{'variant':<36} {'frames':>6} {'size':>5} {'labels':>6}  dataset")
    for variant in VARIANTS.values():
        print(
            f"{variant.name:<36} {variant.num_frames:>6} {variant.image_size:>5} {variant.num_labels:>6}  "
            f"{variant.dataset}"
        )
    return 0


def _command_rules(args) -> int:
    from .rules import as_table

    table = as_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    name_width = max(len(row["name"]) for row in table)
    source_width = max(len(row["source"]) for row in table)
    for row in table:
        print(f"{row['name']:<{name_width}}  {row['source']:<{source_width}} -> {row['target']}")
    return 0


def _resolve_labels(args, variant, num_labels):
    from .labels import hub_label_absence, hub_label_file, read_hub_label_file, read_label_file

    if args.labels is not None:
        return read_label_file(args.labels, num_labels)
    if variant is None:
        logger.warning("no label map: config.json gets generic LABEL_N names; pass --labels FILE (JSON index -> name)")
        return None
    path = hub_label_file(variant, download=args.fetch_labels)
    if path is None:
        how = "pass --labels FILE" if args.fetch_labels else "pass --labels FILE or --fetch-labels"
        logger.warning(
            "no label map for %s (%s): config.json gets generic LABEL_N names; %s",
            variant.name,
            hub_label_absence(variant),
            how,
        )
        return None
    return read_hub_label_file(path, num_labels)


def _warn_about_guesses(args, variant, shape) -> None:
    """Warn when config.json gets a value the checkpoint's shapes do not hold and the user did not give. (A
    space-only model's frame count is never guessed: converting one without --num-frames is refused.)"""
    if variant is None and args.num_attention_heads is None and shape.hidden_size % 64:
        logger.warning(
            "hidden size %d is not a multiple of 64: assumed %d attention head(s), which shapes cannot confirm; "
            "pass --num-attention-heads N",
            shape.hidden_size,
            shape.num_attention_heads,
        )


def _checkpoint_source(args, variant) -> tuple[Path, str]:
    """The local path of the checkpoint to convert (fetched first when it is a URL or a variant's own), and the
    name of the original file for the output's metadata."""
    from .checksums import ChecksumLock, default_lock_path
    from .download import fetch_url, fetch_variant, is_url

    lock = ChecksumLock(args.checksums if args.checksums is not None else default_lock_path())
    fetching = {
        "lock": lock,
        "record": args.record_checksums,
        "timeout": args.timeout,
        "progress": sys.stderr.isatty(),
    }
    if args.source is None:
        if variant is None:
            raise ConversionError("no checkpoint given: pass a file or URL, or --variant NAME to fetch its release")
        path = fetch_variant(variant, checkpoint_dir=args.checkpoint_dir, **fetching)
        return path, variant.original_file
    if _FOREIGN_URL.match(args.source) and not is_url(args.source) and not Path(args.source).exists():
        scheme = args.source.partition(":")[0]
        raise ConversionError(
            f"{args.source}: {scheme} URLs are not downloaded, only http(s); download the file yourself and pass "
            "its path"
        )
    if is_url(args.source):
        from urllib.parse import unquote, urlsplit

        return fetch_url(args.source, **fetching), Path(unquote(urlsplit(args.source).path)).name
    if args.record_checksums:
        raise ConversionError(
            f"{args.source}: --record-checksums pins downloads, and a local file is not one; give a URL, or "
            "--variant with --checkpoint-dir"
        )
    return Path(args.source), Path(args.source).name


def _drop_cached(path: Path) -> str:
    """Delete ``path`` when it is a download in the cache that cannot be loaded (damaged after it was checked in), so
    that the next run downloads it again instead of failing on it forever. Returns what the user should do."""
    from filelock import FileLock

    from .cache import LOCK_TIMEOUT_SECONDS, cache_dir

    if cache_dir().resolve() not in path.resolve().parents:
        return "replace that file with a good copy"
    with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_SECONDS):
        path.unlink(missing_ok=True)
    logger.info("removed the damaged cached download %s", path)
    return "the cached copy was removed, so the next run downloads it again"


def _command_convert(args) -> int:
    from .checkpoint import read_state_dict
    from .convert import check_output, convert_state_dict, transformers_config, write_output
    from .download import is_url
    from .variants import get_variant

    variant = get_variant(args.variant) if args.variant else None
    check_output(args.out, args.overwrite, args.source)
    if args.labels is not None and not args.labels.is_file():
        what = (
            "is a directory, not a label file"
            if args.labels.is_dir()
            else "is not a regular file"
            if args.labels.exists()
            else "label file not found"
        )
        raise ConversionError(f"{args.labels}: {what}; give a JSON file mapping class index to name")

    started = time.perf_counter()
    path, original_name = _checkpoint_source(args, variant)
    # Checked again now that the file is known: --checkpoint-dir or the cache may have supplied it.
    check_output(args.out, args.overwrite, path)
    shown = args.source or str(path)
    try:
        state_dict = read_state_dict(path)
    except CheckpointError as e:
        if args.source is not None and not is_url(args.source):
            raise
        raise CheckpointError(f"{e}; {_drop_cached(path)}") from e
    # Labels are looked up once the checkpoint passed every check, so that a refusal is the only line printed.
    tensors, config, shape, counts = convert_state_dict(
        state_dict, variant, args.num_attention_heads, args.num_frames, source=shown
    )
    _warn_about_guesses(args, variant, shape)
    labels = _resolve_labels(args, variant, shape.num_labels)
    if labels:
        config = transformers_config(shape, variant, labels)
    metadata = {"source_file": original_name, "variant": variant.name if variant else ""}
    complete = []
    try:
        write_output(
            args.out,
            tensors,
            config,
            shape.image_size,
            metadata,
            overwrite=args.overwrite,
            source=path,
            on_complete=lambda: complete.append(True),
        )
        frames = shape.num_frames if shape.num_frames is not None else config.num_frames
        print(
            f"converted {shown} -> {args.out}: {len(tensors)} tensors, {shape.attention_type}, "
            f"{frames} frames x {shape.image_size} px, {shape.num_labels} labels"
            f"{' (named)' if labels else ''}, {time.perf_counter() - started:.1f} s"
        )
    except KeyboardInterrupt as interrupt:
        if complete:
            raise type(interrupt)(f"interrupted after {args.out} was written; the output there is complete") from None
        raise
    return 0


def _command_cache(args) -> int:
    from .cache import CACHE_ENV, cache_location, clean, unclean_reason, usage

    # Neither action creates the folder: looking at a cache that is not there yet must not make one.
    root = cache_location()
    if args.action == "clean":
        print(f"removed {clean(root) / 2**20:.1f} MiB from {root}")
        return 0
    entries, size = usage(root)
    noun = "entry" if entries == 1 else "entries"
    where = f"from {CACHE_ENV}" if os.environ.get(CACHE_ENV) else f"set {CACHE_ENV} to move it"
    if not root.exists():
        note = " (the folder does not exist yet)"
    else:
        refusal = unclean_reason(root)
        note = f"; `cache clean` will not empty it: {refusal}" if refusal else ""
    print(f"{root} ({where}): {entries} {noun}, {size / 2**20:.1f} MiB{note}")
    return 0


def _command_selfcheck(args) -> int:
    from .selfcheck import format_table, run_selfcheck
    from .variants import VARIANTS, get_variant

    variants = [get_variant(name) for name in args.variant] if args.variant else list(VARIANTS.values())
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        rows = run_selfcheck(variants, args.work_dir, args.forward_blocks, keep=True)
    else:
        with tempfile.TemporaryDirectory(prefix="timesformer-selfcheck-") as work_dir:
            rows = run_selfcheck(variants, Path(work_dir), args.forward_blocks)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([row.as_dict() for row in rows], indent=2) + "\n")
    failed = [row.variant for row in rows if not row.ok]
    if failed:
        print(f"error: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"all {len(rows)} variants converted with complete key coverage and matching logits")
    return 0


COMMANDS = {
    "convert": _command_convert,
    "list": _command_list,
    "rules": _command_rules,
    "cache": _command_cache,
    "selfcheck": _command_selfcheck,
}


def _quiet_transformers(restore: contextlib.ExitStack) -> None:
    """Only transformers' errors, and no progress bars, until ``restore`` closes."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    restore.callback(transformers_logging.set_verbosity, transformers_logging.get_verbosity())
    if transformers_logging.is_progress_bar_enabled():
        restore.callback(transformers_logging.enable_progress_bar)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def _console(debug: bool, verbose: bool):
    """The command's messages go to the current stderr as ``LEVEL: message``; library warnings are hidden unless
    ``debug``. Everything is put back afterwards, so ``main`` can also be called from Python."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    with contextlib.ExitStack() as restore:
        restore.callback(setattr, logger, "propagate", logger.propagate)
        restore.callback(logger.setLevel, logger.level)
        restore.callback(logger.removeHandler, handler)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
        logger.propagate = False
        restore.enter_context(warnings.catch_warnings())
        if not debug:
            warnings.simplefilter("ignore")
            _quiet_transformers(restore)
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        os.getcwd()
    except FileNotFoundError:  # transformers, among others, resolves relative paths while it is imported
        print("error: the current folder no longer exists; change to an existing one and run again", file=sys.stderr)
        return EXIT_FAILED
    with _console(args.debug, args.verbose):
        try:
            return COMMANDS[args.command](args)
        except BrokenPipeError as error:
            if _reader_gone():
                return 128 + signal.SIGPIPE  # what a command killed by SIGPIPE reports, as in `... | head -1`
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return EXIT_FAILED
        except (ConversionError, FileExistsError, OSError) as error:
            if args.debug:
                logger.exception("failed")
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt as interrupt:
            print(f"error: {interrupt.args[0] if interrupt.args else _interrupted(args)}", file=sys.stderr)
            return _interrupt_status(interrupt)
        except Exception as error:  # an input the checks above did not foresee: still one line
            if args.debug:
                logger.exception("failed")
            print(
                f"error: unexpected {type(error).__name__}: {_one_line(error)}; rerun with --debug for the traceback",
                file=sys.stderr,
            )
            return EXIT_FAILED


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (``| head``). If so, further writes, the interpreter's
    last flush included, are sent to the null device, so that nothing more is reported about it."""
    import select

    try:
        descriptor = sys.stdout.fileno()
        poller = select.poll()
        poller.register(descriptor, 0)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # not a real file (tests capture it), or already closed
        return False
    if gone:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, descriptor)
        os.close(null)
    return gone


def _interrupted(args) -> str:
    """What an interrupt left behind, by command."""
    if args.command == "convert":
        return "interrupted; no output was written"
    if args.command == "selfcheck" and args.work_dir is not None:
        return f"interrupted; what was built so far stays in {args.work_dir}"
    return "interrupted"


def _interrupt_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status a shell reports for the signal that caused ``interrupt``: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def _terminate(_number, _frame):
    raise Terminated()


def script() -> int:
    """The ``timesformer-convert`` command: :func:`main` on this process's arguments, before the process exits.

    SIGTERM is handled like Ctrl-C (the same clean-up, exit status 143); once :func:`main` has returned, both are
    ignored, so that an interrupt while the interpreter shuts down prints no traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        status = main()
    except KeyboardInterrupt as interrupt:  # before a command began: parsing the arguments, importing
        print("error: interrupted", file=sys.stderr)
        status = _interrupt_status(interrupt)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Nothing needs collecting any more. Freezing the heap spares the interpreter's last garbage collections a walk
    # over every object torch and transformers created: up to a second of exit time.
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(script())
