"""`pylocalai run MODEL "prompt"` streams a completion to the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pylocalai.errors import PylocalaiError


def _run(args: argparse.Namespace) -> int:
    from pylocalai.model import Llama
    from pylocalai.models import resolve_model_path

    path = resolve_model_path(args.model)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed, "stop": args.stop or None}
    with Llama(path, n_ctx=args.ctx_size, n_threads=args.threads, n_parallel=1) as llm:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        stream = (llm.chat_stream([{"role": "user", "content": prompt}], **sampling) if args.chat
                  else llm.generate(prompt, **sampling))
        out = sys.stdout
        for chunk in stream:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
            if chunk.finish_reason is not None:
                out.write("\n")
                if args.verbose and chunk.usage is not None:
                    print(f"[{chunk.finish_reason}: {chunk.usage.prompt_tokens} prompt + "
                          f"{chunk.usage.completion_tokens} generated tokens]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pylocalai", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="stream a completion of a prompt to the terminal")
    run.add_argument("model", help="path to a .gguf file, or 'default' for the bundled SmolLM2-135M-Instruct")
    run.add_argument("prompt", nargs="?", help="prompt text (read from stdin when absent)")
    run.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    run.add_argument("-n", "--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--top-k", type=int, default=40)
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--stop", action="append", help="stop string (repeatable)")
    run.add_argument("-c", "--ctx-size", type=int, default=4096)
    run.add_argument("-t", "--threads", type=int, default=None)
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return int(args.func(args))
    except PylocalaiError as exc:
        print(f"pylocalai: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
