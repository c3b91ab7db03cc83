"""WhiFlash live: which drafter proposes each token, and how much faster it is than plain generate().

A Hugging Face Space (Gradio, CPU): run `python demo/app.py`, then open http://localhost:7860.
"""

import html
import os
import queue
import threading
import time
from pathlib import Path

from hf_whiflash.extras import require

require("demo", "the WhiFlash demo")
import gradio as gr  # after the check: its error names the extra
import torch
from transformers import StoppingCriteria

from hf_whiflash import DEFAULT_TARGET, load_target
from hf_whiflash.assistant import build_assistant
from hf_whiflash.calibration import describe
from hf_whiflash.names import DFLASH, EAGLE, LOOKUP, POLICY_FOLDER, SAMPLING, TARGET
from hf_whiflash.routing import EntropyPolicy, NeuralPolicy
from hf_whiflash.streaming import ProvenanceStreamer, TokenTexts
from hf_whiflash.targets import shipped_drafters

TARGET_NAME = os.environ.get("WHIFLASH_TARGET", DEFAULT_TARGET)  # a packaged target's GGUF downloads on first load
MAX_TOKENS = 512
# A colour for every source ProvenanceStreamer names: each route's drafts, the target's own and corrected tokens.
COLOURS = {EAGLE: "#2f7fd8", DFLASH: "#f08a24", LOOKUP: "#2e9e4f", TARGET: "#9a9a9a", "correction": "#9a9a9a"}
LEGEND = " &nbsp; ".join([f"<span style='color:{COLOURS[source]}'>■ {name}</span>" for source, name in
                          ((EAGLE, "EAGLE-3 draft"), (DFLASH, "DFlash draft"), (LOOKUP, "lookup draft"),
                           (TARGET, "target"))] + ["<u style='text-decoration-color:red'>target corrected a draft</u>"])
DRAFTERS = os.environ.get("WHIFLASH_DRAFTERS") or shipped_drafters(TARGET_NAME)
# label -> (drafters to route between, policy; None keeps the folder's own)
MODES = {"WhiFlash (entropy router)": ("whiflash", EntropyPolicy()), "EAGLE-3 only": (EAGLE, None),
         "DFlash only": (DFLASH, None), "lookup only": (LOOKUP, None)}
if DRAFTERS is not None and (Path(DRAFTERS) / POLICY_FOLDER).is_dir():
    MODES = {"WhiFlash (neural router)": ("whiflash", NeuralPolicy.from_pretrained(Path(DRAFTERS) / POLICY_FOLDER))} \
        | MODES

# plain generate() runs in the same dtype
target, tokenizer = load_target(TARGET_NAME, dtype=os.environ.get("WHIFLASH_DTYPE", "float32"))
# Draft lengths: chosen for this machine unless set (e.g. to show drafting where calibration turns it off).
LENGTHS = {"eagle_steps": os.environ.get("WHIFLASH_EAGLE_STEPS"),
           "dflash_block_size": os.environ.get("WHIFLASH_BLOCK_SIZE")}
assistants = {label: build_assistant(target, TARGET_NAME, mode, DRAFTERS, policy,
                                     **{k: int(v) for k, v in LENGTHS.items() if v})
              for label, (mode, policy) in MODES.items()}
# One generation at a time: on 2 cores, overlapping generations would slow each other and corrupt the timings
# shown. A visitor who leaves mid-generation cancels it, so the next one does not wait for it to finish.
generating = threading.Lock()


class Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def span(text: str, source: str) -> str:
    style = f"color:{COLOURS[source]}"
    if source == "correction":
        style += ";text-decoration:underline;text-decoration-color:red"
    return f"<span class='tok tok-{source}' style='{style}'>{html.escape(text)}</span>"


def stats_markdown(stats, tokens: int, seconds: float, plain: tuple[int, float] | None = None) -> str:
    summary = stats.summary()
    per_route = summary["rounds_per_route"]
    lines = [f"**{tokens / max(seconds, 1e-9):.1f} tok/s** ({tokens} tokens, {seconds:.2f} s)",
             f"acceptance length **{summary['acceptance_length']:.2f}** tokens/round" if summary["rounds"] else "",
             "rounds: " + ", ".join(f"{r} {n}" for r, n in per_route.items()) if per_route else ""]
    if plain:
        plain_tokens, plain_seconds = plain
        speedup = (tokens / seconds) / (plain_tokens / plain_seconds)
        lines.append(f"plain generate(): **{plain_tokens / plain_seconds:.1f} tok/s** → WhiFlash **{speedup:.2f}x**")
    return "  \n".join(line for line in lines if line)


def generate(prompt: str, mode_label: str, max_tokens: int, sampling: bool):
    """Stream (coloured html, statistics) while WhiFlash generates, then time plain generate()."""
    if not prompt or not prompt.strip():
        yield "<i>Please enter a prompt.</i>", ""
        return
    if not 1 <= int(max_tokens) <= MAX_TOKENS:
        yield f"<i>Max tokens must be between 1 and {MAX_TOKENS}.</i>", ""
        return
    assistant = assistants[mode_label]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    settings = dict(max_new_tokens=int(max_tokens), do_sample=bool(sampling))
    if sampling:
        settings |= SAMPLING
    with generating:
        yield from stream(assistant, ids, settings)


def stream(assistant, ids, settings: dict):
    chunks: queue.Queue = queue.Queue()
    streamer = ProvenanceStreamer(assistant, lambda tokens, sources: chunks.put((tokens, sources)))
    cancel = threading.Event()

    def run():
        try:
            torch.manual_seed(0)
            target.generate(ids, assistant_model=assistant, streamer=streamer, stopping_criteria=[Cancelled(cancel)],
                            **settings)
            chunks.put(None)
        except Exception as error:  # shown in the UI: an exception must not leave the page waiting forever
            chunks.put(error)

    worker = threading.Thread(target=run, daemon=True)
    start = time.perf_counter()
    worker.start()
    texts, parts, count = TokenTexts(tokenizer), [], 0
    try:
        while isinstance(item := chunks.get(), tuple):
            tokens, sources = item
            parts += [span(text, source) for text, source in zip(texts.add(tokens), sources)]
            count += len(tokens)
            yield "".join(parts), stats_markdown(streamer.stats, count, time.perf_counter() - start)
    finally:  # also when the visitor leaves: stop the worker before the next generation starts
        cancel.set()
        worker.join()
    if item is not None:
        yield "".join(parts), f"**Generation failed:** {html.escape(f'{type(item).__name__}: {item}')}"
        return
    seconds = time.perf_counter() - start
    yield "".join(parts), stats_markdown(streamer.stats, count, seconds) + "  \n_timing plain generate()…_"
    torch.manual_seed(0)
    plain_start = time.perf_counter()
    plain = target.generate(ids, **settings)
    plain_seconds = time.perf_counter() - plain_start
    plain_run = (plain.shape[1] - ids.shape[1], plain_seconds)
    yield "".join(parts), stats_markdown(streamer.stats, count, seconds, plain_run) \
        + f"  \ndraft lengths: {describe(assistant)}"


with gr.Blocks(title="WhiFlash") as app:
    gr.Markdown("# ⚡ WhiFlash: speculative decoding that switches drafters token by token\n"
                f"Target: **{TARGET_NAME}** ({str(target.dtype).removeprefix('torch.')}) on "
                f"{target.device.type.upper()}. Each token is coloured by the route that proposed it.")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                value="Write a Python function that checks whether a number is prime.")
            with gr.Row():
                mode = gr.Dropdown(list(MODES), value=next(iter(MODES)), label="Drafters and router")
                max_tokens = gr.Number(value=128, precision=0, label=f"Max new tokens (1–{MAX_TOKENS})", elem_id="max-tokens")
                sampling = gr.Checkbox(label=f"Sampling (T={SAMPLING['temperature']}, top-p {SAMPLING['top_p']})",
                                       value=False)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=1):
            stats = gr.Markdown(elem_id="stats")
    gr.HTML(LEGEND)
    output = gr.HTML(elem_id="output")
    button.click(generate, [prompt, mode, max_tokens, sampling], [output, stats])

if __name__ == "__main__":
    app.queue().launch(server_name=os.environ.get("HOST", "0.0.0.0"), server_port=int(os.environ.get("PORT", 7860)))
