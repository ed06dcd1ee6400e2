"""The Gradio layer of `app.py`: the command line, the page, and the wiring to a :class:`Studio`.

The logic (cached pipeline, adapter discovery and switching, limits, sampling) lives in
:mod:`flatlora_diffusion.app_studio`; this module only turns UI values into its calls and its
:class:`StudioError` messages into ``gr.Error`` pop-ups.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from functools import wraps

from flatlora_diffusion.app_studio import DEFAULT_SCHEDULER, TRAIN_HINT, Limits, Studio, StudioError

logger = logging.getLogger(__name__)

# The embedded default: the pretrained toy model and the adapter folder of `configs/demo.yaml` (a test
# checks they match), so `python app.py` after the README's main job shows its adapter offline.
DEFAULT_BASE = "toy:sd"
DEFAULT_ADAPTERS = ("outputs/demo",)
QUEUE_SIZE = 16  # requests waiting beyond this are refused ("queue full") instead of piling up
MAX_UPLOAD = "1kb"  # the page has no upload control: a larger POST to /gradio_api/upload is refused (413)
GRADIO_DIR = ".gradio"  # Gradio's uploads and copies of results, inside the studio's folder (removed on exit)
API_NAME = "generate"  # the one API endpoint: `gradio_client.Client(url).predict(..., api_name="/generate")`


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    limits = Limits()
    parser = argparse.ArgumentParser(
        prog="python app.py", description="Sample from trained LoRA / Flat-LoRA adapters side by side.")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="Base model: a diffusers folder, a Hub id, toy:sd (trained toy world) or tiny:sd / tiny:sdxl (random) (default: %(default)s).")
    parser.add_argument("--adapters", nargs="+", default=list(DEFAULT_ADAPTERS), metavar="DIR",
                        help="Folders searched for trainer outputs (`pytorch_lora_weights.safetensors`); "
                             "default: %(default)s.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: %(default)s, this machine only).")
    parser.add_argument("--port", type=int, default=7860, help="Port (default: %(default)s).")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link (needs internet).")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps.")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="Weights' dtype; auto: fp16 on CUDA, fp32 elsewhere.")
    parser.add_argument("--max-steps", type=int, default=limits.max_steps, help="Most denoising steps per image.")
    parser.add_argument("--max-size", type=int, default=limits.max_side, help="Largest width/height (multiple of 8).")
    parser.add_argument("--max-images", type=int, default=limits.max_images, help="Most images per column.")
    parser.add_argument("--max-work", type=int, default=limits.max_work,
                        help="Most work per request: images × columns × steps × width × height / 10^6 "
                             "(megapixel-steps; default %(default)s: 8 images × 2 columns × 50 steps at 1024 px).")
    return parser.parse_args(argv)


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "fp16" if str(device).startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_errors(fn: Callable) -> Callable:
    """Show :class:`StudioError` messages as pop-ups; log anything else and show no stack trace."""
    import gradio as gr

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as err:
            raise gr.Error(str(err), print_exception=False) from err
        except gr.Error:
            raise
        except Exception as err:  # a bug or an out-of-memory: details go to the server log only
            logger.exception("Request failed")
            hint = " Lower the width/height or the number of images." if "out of memory" in str(err).lower() else ""
            raise gr.Error(f"Sampling failed ({type(err).__name__}); the server log has the details.{hint}",
                           print_exception=False) from err
    return wrapper


def build_demo(studio: Studio):
    """The page (controls left, gallery right, the adapters' settings below), with its queue."""
    import gradio as gr

    lim, native, slots = studio.limits, studio.native_size, studio.limits.max_adapters
    # Gradio's copies of results older than an hour are deleted every 10 minutes; `studio.close()` removes the rest.
    with gr.Blocks(title="Flat-LoRA studio", analytics_enabled=False, fill_width=True,
                   delete_cache=(600, 3600)) as demo:
        gr.Markdown("## Flat-LoRA studio — the base model, LoRA and Flat-LoRA adapters on the same seed")
        scales_state = gr.State({"slots": [], "scales": {}})
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", max_length=lim.max_prompt_chars,
                                    value=_default_prompt(studio))
                negative = gr.Textbox(label="Negative prompt", lines=1, max_length=lim.max_prompt_chars, value="")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                selected = gr.CheckboxGroup(choices=list(studio.adapters), value=list(studio.adapters)[:1],
                                            label=f"Adapters (up to {slots})", elem_id="adapters")
                sliders = [gr.Slider(-2, 2, value=1.0, step=0.05, visible=False, label=f"scale {i}",
                                     elem_id=f"scale-{i}") for i in range(slots)]
                compare = gr.Checkbox(value=True, label="Compare: base + each adapter alone, in columns",
                                      elem_id="compare")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**32 - 1, label="Seed", elem_id="seed")
                    randomise = gr.Checkbox(value=False, label="Randomise seed")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=min(20, lim.max_steps), step=1, label="Steps",
                                      elem_id="steps")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
                with gr.Row():
                    width = gr.Slider(64, lim.max_side, value=native, step=8, label="Width")
                    height = gr.Slider(64, lim.max_side, value=native, step=8, label="Height")
                with gr.Row():
                    num_images = gr.Slider(1, lim.max_images, value=1, step=1, label="Images (per column)")
                    scheduler = gr.Dropdown([DEFAULT_SCHEDULER, *studio.schedulers], value=DEFAULT_SCHEDULER,
                                            label="Scheduler")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, height=420, object_fit="contain",
                                     buttons=["download", "fullscreen"])
                gr.Markdown("Downloads are PNGs with the settings as text chunks.")
                status = gr.Markdown(label="Summary", elem_id="status")
        with gr.Accordion("Adapters and their training settings", open=True):
            table = gr.Markdown(studio.describe(), elem_id="adapter-table")
            with gr.Row():
                with gr.Column(scale=1):
                    shown = gr.Dropdown(list(studio.adapters), value=next(iter(studio.adapters), None),
                                        label="Validation images of")
                    rescan = gr.Button("Rescan adapter folders", size="sm")
                validation = gr.Gallery(value=studio.validation_images(next(iter(studio.adapters), "")),
                                        columns=4, height=160, label="Validation images", scale=3)

        def assign(names, state, *values):
            """Give each selected adapter a scale slider, keeping the scale it had before."""
            scales = dict(state["scales"])
            scales.update(zip(state["slots"], values, strict=False))
            names = list(names or [])[:slots]
            updates = [gr.Slider(visible=i < len(names), label=f"Scale of {names[i]}" if i < len(names) else "scale",
                                 value=scales.get(names[i], 1.0) if i < len(names) else 1.0) for i in range(slots)]
            return {"slots": names, "scales": scales}, *updates

        # B008: gradio finds its progress tracker by the `gr.Progress()` default.
        @ui_errors
        def generate(prompt: str, negative_prompt: str, adapters: list[str], compare: bool, seed: int,
                     randomise_seed: bool, steps: int, guidance_scale: float, width: int, height: int,
                     num_images: int, scheduler: str, progress=gr.Progress(), request=None,  # noqa: B008
                     **scales: float):
            """Draw images with the selected adapters (the app's API: `client.predict(..., api_name="/generate")`).

            Parameters:
                prompt: what to draw
                negative_prompt: what to avoid ("" for none)
                adapters: names of the adapters to use, as the page lists them (at most 4 by default)
                compare: true: the base and each adapter alone, one column each; false: all adapters together
                seed: seed of the first image; image i uses seed + i
                randomise_seed: draw a random seed instead (the seed used is returned)
                steps: denoising steps
                guidance_scale: classifier-free guidance scale
                width: image width in pixels (multiple of 8)
                height: image height in pixels (multiple of 8)
                num_images: images per column
                scheduler: `default` (the base model's own) or a scheduler name
                scale_0: scale of the first adapter in `adapters` (scale_1 of the second, and so on)
            Returns:
                the images with captions, row by row; the seed used; a summary of what was drawn
            """
            names = list(adapters or [])
            if len(names) > slots:
                raise StudioError(f"Select at most {slots} adapters, got {len(names)}.")
            seed_value = secrets.randbelow(2**32) if randomise_seed else seed
            settings = studio.settings(prompt, negative_prompt, seed=seed_value, steps=steps,
                                       guidance_scale=guidance_scale, width=width, height=height,
                                       num_images=num_images, scheduler=scheduler)
            chosen = dict(zip(names, [scales[f"scale_{i}"] for i in range(slots)], strict=False))
            run_fn = studio.compare if compare else studio.generate
            session = getattr(request, "session_hash", None)
            result = run_fn(settings, chosen, progress=lambda done, total, what: progress((done, total), desc=what),
                            stop=(lambda: client_gone(demo, session)) if session else None)
            return result.gallery(), settings.seed, result.summary()

        # Gradio passes the request to a parameter whose type hint is `gr.Request`; the hint is set here
        # as an object because this module imports gradio lazily (a string hint would not resolve).
        generate.__annotations__["request"] = gr.Request

        def layout(names, compare_all):
            """The gallery's columns for the request about to run: one per model drawn."""
            return gr.Gallery(columns=1 + len(list(names or [])[:slots]) if compare_all else 1)

        def refresh(names):
            studio.scan()
            kept = [name for name in names or [] if name in studio.adapters]
            first = next(iter(studio.adapters), None)
            return (gr.CheckboxGroup(choices=list(studio.adapters), value=kept), studio.describe(),
                    gr.Dropdown(choices=list(studio.adapters), value=first), studio.validation_images(first or ""))

        # Cheap UI events skip the one-at-a-time limit, so they never wait behind a generation. Only
        # `generate` is part of the API; the other events only update the page.
        fast = {"concurrency_limit": None, "show_progress": "hidden", "api_visibility": "private"}
        selected.change(assign, [selected, scales_state, *sliders], [scales_state, *sliders], **fast)
        demo.load(assign, [selected, scales_state, *sliders], [scales_state, *sliders], **fast)
        inputs = [prompt, negative, selected, compare, seed, randomise, steps, guidance, width, height, num_images,
                  scheduler]
        run.click(layout, [selected, compare], [gallery], **fast).then(
            generate, inputs, [gallery, seed, status], inputs_kwargs={f"scale_{i}": s for i, s in enumerate(sliders)},
            api_name=API_NAME, concurrency_limit=1)
        rescan.click(ui_errors(refresh), [selected], [selected, table, shown, validation], concurrency_limit=1,
                     api_visibility="private")
        shown.change(lambda name: studio.validation_images(name or ""), [shown], [validation], **fast)
    # One generation at a time (the pipeline is shared); others wait in line, up to QUEUE_SIZE of them.
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def client_gone(demo, session_hash: str) -> bool:
    """Whether the client of ``session_hash``'s running request has gone (closed the page or its connection).

    Gradio notices a closed event stream and marks the session's running job dead (``alive = False``)
    but lets the function run on; this reads that mark. It is Gradio's internal queue state (checked
    with gradio 6.31): if it moves, this returns False and requests simply run to the end.
    """
    for job in getattr(getattr(demo, "_queue", None), "active_jobs", None) or []:
        for event in job or []:
            if getattr(event, "session_hash", None) == session_hash:
                return not getattr(event, "alive", True)
    return False


def _default_prompt(studio: Studio) -> str:
    """The first adapter's instance prompt (what the newcomer's adapter was trained on), if a valid prompt."""
    for info in studio.adapters.values():
        prompt = info.training.get("instance_prompt")
        if isinstance(prompt, str) and 0 < len(prompt) <= studio.limits.max_prompt_chars:
            return prompt
    return "a photo of a dog"


def launch(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           prevent_thread_lock: bool = False):
    """Serve the page; returns the Blocks (``demo.close()`` stops it when ``prevent_thread_lock``).

    Gradio keeps its files in ``GRADIO_TEMP_DIR`` (default: a `/tmp/gradio` shared by every app, never
    emptied); the app points it at a folder inside ``studio.out_dir``, which ``studio.close()`` removes.
    """
    cache = studio.out_dir / GRADIO_DIR
    cache.mkdir(exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # read when the Blocks and its server are made, and per request
    demo = build_demo(studio)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, show_error=False,
                prevent_thread_lock=prevent_thread_lock, footer_links=[], max_file_size=MAX_UPLOAD)
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no telemetry calls
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        limits = Limits(max_steps=args.max_steps, max_side=args.max_size, max_images=args.max_images,
                        max_work=args.max_work)
        device, dtype = _device_and_dtype(args.device, args.dtype)
        studio = Studio.open(args.base, args.adapters, device=device, dtype=dtype, limits=limits)
    except ValueError as err:  # bad flag, unloadable base model: the message names it and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Base model `{args.base}` on {device}; {len(studio.adapters)} adapter(s) found under "
          f"{', '.join(args.adapters)}: {', '.join(studio.adapters) or 'none'}.", flush=True)
    for folder, reason in studio.skipped:
        print(f"Skipped `{folder}`: {reason}", flush=True)
    if not studio.adapters:
        print(f"No adapter yet: train one with `{TRAIN_HINT}`, then click Rescan.", flush=True)
    if not _is_loopback(args.host) or args.share:
        print(f"WARNING: the app is reachable beyond this machine ({'share link' if args.share else args.host}) "
              "and has no authentication.", flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it like Ctrl-C: cleanup runs
    try:
        launch(studio, host=args.host, port=args.port, share=args.share)
    finally:
        signal.signal(signal.SIGTERM, previous)
        studio.close()
    return 0
