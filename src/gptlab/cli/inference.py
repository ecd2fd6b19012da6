"""Sub-commands that use models: generate, serve, chat, convert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from gptlab.cli.common import add_model_flags, fail
from gptlab.cli.moderation import add_moderator_flags
from gptlab.sampling import SamplingConfig
from gptlab.serve import limits

SAMPLING_FLAGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "ignore_eos",
)
CHAT_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")  # what `gptlab chat` offers


def _sampling(args: argparse.Namespace, flags: tuple[str, ...] = SAMPLING_FLAGS) -> dict:
    """The sampling settings the command's flags give (SamplingConfig's keyword arguments)."""
    return {name: getattr(args, name) for name in flags}


def unescape(text: str) -> str:
    """A flag's backslash escapes read as in a Python string literal (`--stop "\\n\\n"` is two newlines)."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as err:
        fail(f"bad escape sequence in {text!r}: {err.reason} (write a backslash as \\\\)")


def cmd_generate(args: argparse.Namespace) -> None:
    if args.stream and (len(args.prompt) > 1 or args.num_beams > 1):
        fail("--stream takes a single --prompt and no --num-beams")
    speculative = args.draft or args.prompt_lookup
    if speculative and args.num_beams > 1:
        fail("speculative decoding (--draft, --prompt-lookup) does not combine with --num-beams")
    if speculative and args.slide_context:
        fail("speculative decoding (--draft, --prompt-lookup) does not combine with --slide-context")
    sampling = _sampling(args)
    sampling["stop"] = [unescape(stop) for stop in args.stop]
    cfg = SamplingConfig(**sampling)  # bad values fail before the model loads
    if args.image and (len(args.prompt) > 1 or args.num_beams > 1):
        fail("--image takes a single --prompt and no --num-beams")
    if args.num_beams > 1:
        from gptlab.language_model import check_beam_settings

        check_beam_settings(cfg, args.slide_context)
    lm = _load(args)
    slide = args.slide_context
    if args.image:
        _generate_with_images(lm, args.prompt[0], args.image, args.stream, dict(sampling, slide=slide))
        return
    if args.stream:
        print(args.prompt[0], end="", flush=True)
        for piece in lm.stream(args.prompt[0], slide=slide, **sampling):
            print(piece, end="", flush=True)
        print()
        return
    if lm.speculation is not None:
        completions = lm.complete(args.prompt, cfg)
        outputs = [c.text for c in completions]
        _report_speculation(lm.speculation.method, completions)
    else:
        outputs = lm.generate(
            args.prompt, num_beams=args.num_beams, length_penalty=args.length_penalty, slide=slide, **sampling
        )
    print("\n\n".join(prompt + output for prompt, output in zip(args.prompt, outputs, strict=True)))


def _generate_with_images(lm, question: str, images: list[str], stream: bool, sampling: dict) -> None:
    """A question about images, asked as a user message in the model's prompt style with the images first
    (a prompt that already has <image> placeholders is used as it is); prints the answer."""
    from gptlab.prompts import Message
    from gptlab.vision import IMAGE_PLACEHOLDER

    prompt = question
    if IMAGE_PLACEHOLDER not in question:
        prompt = lm.prompt_style.render([Message("user", f"{IMAGE_PLACEHOLDER}\n" * len(images) + question)])
    if stream:
        for piece in lm.stream(prompt, images=images, **sampling):
            print(piece, end="", flush=True)
        print()
        return
    print(lm.generate(prompt, images=images, **sampling)[0])


def _report_speculation(method: str, completions: list) -> None:
    """One line on stderr: how many guesses the model kept, tokens per target pass."""
    from gptlab.speculative import SpecUsage

    total = SpecUsage()
    for completion in completions:
        total.add(completion.speculation)
    print(
        f"speculative ({method}): {total.accepted} of {total.drafted} guesses accepted "
        f"({100 * total.acceptance_rate:.0f}%), {total.tokens_per_pass:.2f} tokens per target pass",
        file=sys.stderr,
    )


def _load(args: argparse.Namespace, loaded=None):
    """The model of --ckpt (or the `loaded` one) with the speculation its flags ask for (--draft,
    --prompt-lookup)."""
    from gptlab.language_model import LanguageModel

    speculation = dict(
        draft=getattr(args, "draft", None),
        num_draft_tokens=getattr(args, "num_draft_tokens", 4),
        prompt_lookup=getattr(args, "prompt_lookup", False),
    )
    if loaded is None:
        return LanguageModel.load(args.ckpt, args.device, quantize=args.quantize, **speculation)
    return LanguageModel.from_loaded(loaded, args.device, quantize=args.quantize, **speculation)


def _load_for_serving(args: argparse.Namespace, predictors: bool = False):
    """The model to serve or chat with; with `predictors`, a classifier or tagger becomes a Predictor."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            fail(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not predictors:
        return _load(args)
    from gptlab import loading
    from gptlab.finetune.predict import Predictor

    loaded = loading.load(args.ckpt)
    if loaded.task in ("classify", "tag"):
        if args.quantize:
            fail("--quantize applies to language models, not to a classifier or tagger")
        return Predictor(loaded, args.device)
    return _load(args, loaded)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from gptlab.serve.app import ServeConfig, listen, serve
        from gptlab.serve.ops import OpsConfig, load_keys
    except ImportError as err:
        fail(f"serving needs the serve extra ({err.name} is missing): pip install 'gptlab[serve]'")
    path = Path(args.ckpt).resolve()
    name = args.model_name or (path.parent.name if path.is_file() else path.name)
    ops = OpsConfig(
        api_keys=load_keys(args.api_key, args.api_key_file),
        allowed_hosts=(args.allowed_hosts or "").split(","),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        log_prompts=args.log_prompts,
    )
    cfg = ServeConfig(
        model_name=name,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        limits=limits.Limits(**{f: getattr(args, f) for f in limits.FLAGS}),
        ops=ops,
        drain_timeout=args.drain_timeout,
        moderate=args.moderate,
        moderator=args.moderator,
        moderation_threshold=args.moderation_threshold,
        safe_label=args.safe_label,
    )
    with listen(args.host, args.port) as sock:  # before loading the model: a busy port fails fast
        serve(_load_for_serving(args, predictors=True), cfg, sock, log_level=args.log_level)


def cmd_chat(args: argparse.Namespace) -> None:
    from gptlab import chat

    chat.main(_load_for_serving(args), system=args.system, **_sampling(args, CHAT_SAMPLING_FLAGS))


def cmd_convert(args: argparse.Namespace) -> None:
    from gptlab import checkpoint, hf, loading
    from gptlab.outputs import check_new_output

    out = check_new_output(args.out)
    if args.from_hf:
        model, tokenizer = hf.load_hf(args.from_hf)
        checkpoint.save(
            out,
            {
                "model": model.state_dict(),
                "model_config": model.config.to_dict(),
                "tokenizer": tokenizer.to_dict(),
                "step": 0,
            },
        )
    else:
        loaded = loading.load(args.to_hf)
        if loaded.vision is not None:
            from gptlab.finetune.artifacts import refuse_vision

            refuse_vision(args.to_hf, "an HF GPT-2 export")
        model, tokenizer = loaded.gpt(), loaded.tokenizer
        hf.save_hf(model, tokenizer, out)
    print(json.dumps({"out": str(out), "params": model.num_params()}))


def add_speculation_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--draft", metavar="CKPT", help="speculative decoding: a small model with the same tokenizer guesses ahead"
    )
    group.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="speculative decoding: guesses copied from the prompt's n-grams (copy-heavy tasks)",
    )
    p.add_argument(
        "--num-draft-tokens", type=int, default=4, metavar="K", help="tokens guessed per pass of the model"
    )


def register(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    add_model_flags(p)
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image for a multimodal model (repeatable): the prompt is asked about it as a user "
                        "message and only the answer is printed")
    p.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens, help="tokens to generate")
    p.add_argument(
        "--slide-context",
        action="store_true",
        help="let generation run past the model's context: when it is full, the oldest tokens are dropped "
        "(the newest half is kept) and generation goes on; without it such a request is refused",
    )
    p.add_argument(
        "--temperature", type=float, default=SamplingConfig.temperature, help="0 = greedy, or in [0.01, 2]"
    )
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p * p(most likely), in [0, 1]")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=SamplingConfig.repetition_penalty,
        help="> 1 discourages repeats (prompt too)",
    )
    p.add_argument(
        "--presence-penalty", type=float, default=SamplingConfig.presence_penalty, help="in [-2, 2]"
    )
    p.add_argument(
        "--frequency-penalty", type=float, default=SamplingConfig.frequency_penalty, help="in [-2, 2]"
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop string (repeatable); backslash escapes as in Python: --stop '\\n\\n' stops at a blank line",
    )
    p.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="stop token id (repeatable); <|endoftext|> stops unless --ignore-eos",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--seed", type=int, help="random seed of the sampling: prompt i samples with seed + i")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument(
        "--num-beams", type=int, default=1, help="> 1: beam search instead of sampling (no sampling flags)"
    )
    p.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam search: > 0 favours longer outputs"
    )
    add_speculation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a playground at /"
    )
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is printed)")
    p.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on the API (visible in `ps`: prefer the two below)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="API keys, one `name:key` a line (the name is what logs and rate limits show); "
        "$GPTLAB_API_KEY may hold more, comma-separated",
    )
    p.add_argument(
        "--allowed-hosts", metavar="H1,H2", help="answer only these Host headers (*.example.com allowed)"
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="RPS",
        help="requests/s per key (per client without keys); 0 = off",
    )
    p.add_argument(
        "--rate-burst", type=int, metavar="N", help="requests a key may send at once (default: 2 x RPS)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds in-flight requests get to finish (then a 503 error); exit 0",
    )
    p.add_argument(
        "--log-prompts", action="store_true", help="put prompts in the JSON access log (default: redacted)"
    )
    for field in dataclasses.fields(limits.Limits):
        p.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int,
            default=field.default,
            metavar="N",
            help=limits.FLAGS[field.name],
        )
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument(
        "--max-batch-size", type=int, default=8, help="sequences decoded together; 1 turns batching off"
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before requests get 429")
    p.add_argument("--threads", type=int, help="CPU threads for torch (small models decode faster on one)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log messages of this level and above")
    p.add_argument("--moderate", choices=["input", "output", "both"],
                   help="refuse flagged prompts (400 content_policy_violation) and/or stop flagged output "
                   '(finish_reason "content_filter"); the moderator defaults to profanity-check')
    add_moderator_flags(p, None)
    add_speculation_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    add_model_flags(p)
    p.add_argument("--system", help="system prompt (change it in the chat with /system TEXT)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply")
    p.add_argument(
        "--temperature", type=float, default=SamplingConfig.temperature, help="0 = greedy, or in [0.01, 2]"
    )
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, help="random seed of the sampling")
    p.add_argument("--threads", type=int, help="CPU threads for torch (small models decode faster on one)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="Hugging Face GPT-2 <-> gptlab checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face GPT-2 directory to read")
    source.add_argument("--to-hf", metavar="CKPT", help="a gptlab run or checkpoint to write as HF GPT-2")
    p.add_argument("--out", required=True, help="the new checkpoint file or HF directory (never overwritten)")
    p.set_defaults(func=cmd_convert)
