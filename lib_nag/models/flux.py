"""The Flux family: Flux.1 and Chroma on Forge (``backend/nn/flux.py`` and ``backend/nn/chroma.py``, read
at Forge main dfdcbab6) and Flux.1, Flux.1 Kontext and Chroma on Forge Neo (its ComfyUI ports,
``backend/nn/flux.py`` read at 06d6af9a; ``backend/nn/chroma.py`` read in a copy of Neo v3.5,
exo101/sd-webui-forge-neo-v3 @ 5692d2d1), guided as the authors' ComfyUI-NAG does it (see
``lib_nag.joint_attention`` and ``flux_blocks``).

``nag_forward`` builds a replacement for the diffusion model's entry point: Forge main's ``forward``,
or Neo's ``forward_orig`` (Neo's own ``forward`` then makes the patches, ids and Kontext reference
tokens and cuts the reference tokens from the output). When a call's batch has cond chunks and NAG
is active, it runs the blocks itself with one NAG row per positive row (text: the NAG negative
prompt; Flux's pooled vector: the NAG negative's; time, guidance and Chroma's modulations: the
positive row's). Otherwise it calls the model's own entry point. Rows that are not positive get
exactly what the host computes. ``FluxPass`` sets it as an object patch on the pass's cloned patcher.
Neo's Flux.2 shares Neo's Flux.1 model class and entry point: ``models.flux2`` runs it through this
runner with its own modulations (``ModulationsOf``); what the runner does for every Neo build (text
ids on ``txt_ids_dims``, ``txt_norm``) is here.

Kontext's reference tokens are image-stream tokens, as in the authors' NAGFlux: the NAG rows reuse
their positive rows' reference q/k/v, the reference tokens' attention output is guided with the rest
of the image, and the host drops them at the end (``out[:, :img_tokens]``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import PositiveRows
from ..params import NagParams
from ..webui.conditioning import crossattn
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import ForgeModelPass, forge_rows
from ..webui.passes import Forward, OnCall
from .flux_blocks import BlockCall, Inputs, Modulations, chroma_modulations, flux_modulations, run_blocks, scale_and_shift, unchanged
from .runner import patched_forward

STOOD_ASIDE = "a ControlNet, attention mask or block patch on the call, which NAG's own run of the blocks would leave out"


def _patches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forge's forward before ``inner_forward``: circular pad to even sizes, 2×2 patches
    ``[B, h/2·w/2, C·4]``, and their ids ``[B, L, 3]`` (0, row, column) in x's dtype."""
    batch, channels, height, width = x.shape
    x = torch.nn.functional.pad(x, (0, width % 2, 0, height % 2), mode="circular")
    rows, columns = (height + 1) // 2, (width + 1) // 2
    img = x.view(batch, channels, rows, 2, columns, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, channels * 4)
    ids = torch.zeros((rows, columns, 3), device=x.device, dtype=x.dtype)
    ids[..., 1] = ids[..., 1] + torch.linspace(0, rows - 1, steps=rows, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] = ids[..., 2] + torch.linspace(0, columns - 1, steps=columns, device=x.device, dtype=x.dtype)[None, :]
    return img, ids.view(1, rows * columns, 3).expand(batch, -1, -1)


def _image(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Patches back to ``[B, C, height, width]``, the padding cut."""
    batch, _, channels = out.shape
    rows, columns = (height + 1) // 2, (width + 1) // 2
    image = (
        out.view(batch, rows, columns, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, channels // 4, rows * 2, columns * 2)
    )
    return image[:, :, :height, :width]


def _text_ids(rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((rows, tokens, 3), device=like.device, dtype=like.dtype)


def _text_ids_like(model: Any, rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """Text ids as the host's ``forward`` makes them for ``tokens`` text tokens, in the layout of the
    call's text ids ``like``: zero, but ``0 … tokens−1`` on Neo's ``txt_ids_dims`` (Flux.2: axis 3)."""
    ids = like.new_zeros((rows, tokens, like.shape[2]))
    for axis in getattr(model, "txt_ids_dims", ()):
        ids[:, :, axis] = torch.arange(tokens, device=like.device, dtype=like.dtype)
    return ids


def _text_in(model: torch.nn.Module, txt: torch.Tensor) -> torch.Tensor:
    """The context into the text stream: ``txt_in``, after Neo's ``txt_norm`` where the model has one."""
    norm = getattr(model, "txt_norm", None)
    return model.txt_in(txt if norm is None else norm(txt))


def _flux_conditioning(y: torch.Tensor, guidance: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flux's ``forward(x, timestep, context, y, guidance=None, **kwargs)`` arguments after context."""
    return y, guidance


def _is_comfy_port(model: Any) -> bool:
    """Forge Neo's Flux is a port of ComfyUI's: ``forward`` makes the tokens, ``forward_orig`` runs the blocks."""
    return hasattr(model, "forward_orig")


def entry_point(model: Any) -> str:
    """The model's method ``nag_forward`` replaces."""
    return "forward_orig" if _is_comfy_port(model) else "forward"


def _neo_runs_blocks_only(model: torch.nn.Module, named: dict[str, Any]) -> bool:
    """Whether Neo's ``forward_orig`` (its arguments by name) would only run the blocks on this call, as
    NAG does: no ControlNet residuals, attention mask, ``post_input`` or ``dit`` block patches, and for
    a model with a pooled vector (Flux.1) that vector and (for a guidance-distilled model) the guidance
    that NAG's rows take."""
    options = named["transformer_options"]
    patched = "post_input" in options.get("patches", {}) or bool(options.get("patches_replace", {}).get("dit"))
    y, guidance = named.get("y"), named["guidance"]
    has_inputs = not hasattr(model, "vec_in_dim") or (y is not None and (guidance is not None or not model.guidance_embed))
    return named["control"] is None and named["attn_mask"] is None and not patched and has_inputs


ModulationsOf = Callable[[torch.nn.Module, Any, Inputs, Any], tuple[Modulations, torch.Tensor]]
"""(model, its host module, the call's inputs, the NAG negative's conditioning) → the modulations of
the batch and the NAG rows, and the NAG negative's context ``[images, tokens, C]``."""


def flux1_or_chroma(model: torch.nn.Module, host: Any, inputs: Inputs, conditioning: Any) -> tuple[Modulations, torch.Tensor]:
    """Flux.1: its modulation layers on ``vec``, the NAG rows' with the NAG negative's pooled vector,
    and its T5 context (``conditioning`` is the dict); Chroma: its modulation vectors, the NAG rows' the
    positive rows' own, and the T5 tensor ``conditioning``."""
    if hasattr(model, "distilled_guidance_layer"):
        return chroma_modulations(model, host, inputs), crossattn(conditioning)
    vector_negative = inputs.positive.negatives(conditioning["vector"].to(inputs.y))
    return flux_modulations(model, host, inputs, vector_negative), conditioning["crossattn"]


@dataclass(frozen=True)
class _Tokens:
    """One call's token sequences before the input layers: the image's patches (on Neo followed by the
    Kontext reference tokens), the T5 context, and their position ids."""

    img: torch.Tensor
    img_ids: torch.Tensor
    txt: torch.Tensor
    txt_ids: torch.Tensor


class _NagRunner:
    """The guided entry points of one model: Forge main's ``forward`` and Neo's ``forward_orig``."""

    def __init__(
        self,
        model: torch.nn.Module,
        negative: Callable[[], torch.Tensor | dict[str, torch.Tensor]],
        params: NagParams,
        is_active: Callable[[dict], bool],
        on_guided: OnCall | None,
        modulations_of: ModulationsOf,
    ) -> None:
        self.model, self.negative, self.params, self.on_guided = model, negative, params, on_guided
        self.modulations_of = modulations_of
        self.rows_of = forge_rows(is_active, on_guided)
        self.host = sys.modules[type(model.double_blocks[0]).__module__]  # attention, modulation, fp16_fix, embeddings
        self.is_chroma = hasattr(model, "distilled_guidance_layer")

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forge main's ``forward``: patches and ids as the host makes them, the blocks, unpatched."""
        positive = self.rows_of(x, context, kwargs)
        if positive is None:
            return type(self.model).forward(self.model, x, timestep, context, *args, **kwargs)
        img, img_ids = _patches(x)
        y, guidance = (None, None) if self.is_chroma else _flux_conditioning(*args, **kwargs)
        tokens = _Tokens(img, img_ids, context, _text_ids(x.shape[0], context.shape[1], x))
        return _image(self.blocks(tokens, positive, timestep, y, guidance), x.shape[2], x.shape[3])

    def forward_orig(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Neo's ``forward_orig``, called by Neo's ``forward`` and read by the host's own signature:
        Flux.1's and Flux.2's ``(img, img_ids, txt, txt_ids, timesteps, y, guidance, control,
        transformer_options, attn_mask)`` (reference tokens included, the timestep as Neo's ``forward``
        gives it: /1000 at 06d6af9a, unchanged in v3.5) or Chroma's, the same without ``y`` (the timestep
        as given, zero guidance unless given). The step window is the pass's, read from
        ``transformer_options``."""
        model = self.model
        call = inspect.signature(type(model).forward_orig).bind(model, *args, **kwargs)
        call.apply_defaults()
        named = call.arguments
        positive = self.rows_of(named["img"], named["txt"], named)
        if positive is not None and not _neo_runs_blocks_only(model, named):
            if self.on_guided is not None:
                self.on_guided(False, STOOD_ASIDE)
            positive = None
        if positive is None:
            return type(model).forward_orig(*call.args, **call.kwargs)
        tokens = _Tokens(named["img"], named["img_ids"], named["txt"], named["txt_ids"])
        return self.blocks(tokens, positive, named["timesteps"], named.get("y"), named["guidance"])

    def blocks(
        self, tokens: _Tokens, positive: PositiveRows, timestep: torch.Tensor, y: torch.Tensor | None, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        """The input layers, both block stacks with the NAG rows and the final layer: ``[rows, tokens, C·4]``."""
        model, host = self.model, self.host
        img = model.img_in(tokens.img)
        inputs = Inputs(positive, timestep, y, guidance, img.shape[0], img.device, img.dtype)
        modulations, context_negative = self.modulations_of(model, host, inputs, self.negative())
        txt_negative = positive.negatives(context_negative.to(tokens.txt))  # on the call's device before indexing
        txt_ids_negative = _text_ids_like(model, len(positive), txt_negative.shape[1], tokens.txt_ids)
        is_neo = _is_comfy_port(model)
        call = BlockCall(
            positive,
            model.pe_embedder(torch.cat((tokens.txt_ids, tokens.img_ids), dim=1)),
            model.pe_embedder(torch.cat((txt_ids_negative, positive.take(tokens.img_ids)), dim=1)),
            host.attention,
            host.fp16_fix,
            self.params,
            host.apply_mod if is_neo else scale_and_shift,
            host.fp16_fix if is_neo else unchanged,
        )
        out = run_blocks(model, img, _text_in(model, tokens.txt), _text_in(model, txt_negative), modulations, call)
        if self.on_guided is not None:
            self.on_guided(True, "")
        return out


def nag_forward(
    model: torch.nn.Module,
    negative: Callable[[], torch.Tensor | dict[str, torch.Tensor]],
    params: NagParams,
    is_active: Callable[[dict], bool],
    on_guided: OnCall | None = None,
    modulations_of: ModulationsOf = flux1_or_chroma,
) -> Forward:
    """A replacement for the model's ``entry_point`` (a Forge ``IntegratedFluxTransformer2DModel`` or
    ``IntegratedChromaTransformer2DModel``: ``forward``; Neo's Flux.1, Flux.2 and Chroma: ``forward_orig``)
    that guides the cond rows with NAG.

    ``negative()`` is the NAG negative now, one row per image of the batch: for Flux the conditioning
    dict (``crossattn [images, tokens, T5]``, ``vector [images, pooled]``), for Chroma the T5 tensor;
    ``modulations_of`` reads it (Flux.2 passes its own, ``models.flux2``).
    ``is_active(transformer_options)`` says whether NAG guides this call (the step window); when it
    is false, or the call has no cond chunk, the model's own method runs. The call's rows are
    placed from ``cond_or_uncond`` as on the UNet path (whole copies of the batch too); ``on_guided``
    is told, for each active call, whether it was guided, and if not, why ("": its rows could not
    be placed).
    """
    return patched_forward(getattr(_NagRunner(model, negative, params, is_active, on_guided, modulations_of), entry_point(model)))


def is_joint_transformer(model: Any) -> bool:
    """A Flux-like model: double- and single-stream block stacks."""
    return all(hasattr(model, name) for name in ("double_blocks", "single_blocks", "txt_in", "img_in"))


def _neo_blocks_in_flux1_form(model: Any, modulation: bool) -> bool:
    """Neo's blocks as Flux.1 has them: with (or, Chroma, without) per-block modulation layers, text
    before image, Flux.1's MLPs."""
    doubles = all(
        getattr(block, "modulation", None) is modulation and not getattr(block, "flipped_img_txt", False) for block in model.double_blocks
    )
    # Builds without these attributes have only Flux.1's text-first order and MLPs.
    return doubles and all(
        not getattr(block, "yak_mlp", False) and getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim) == block.mlp_hidden_dim
        for block in model.single_blocks
    )


def _is_neo_flux1(model: Any) -> bool:
    """Neo's port in its Flux.1 form: per-block modulation layers, no text norm or text position ids
    (its Flux.2 form is ``models.flux2``'s)."""
    flux1 = {"global_modulation": False, "txt_norm": None, "txt_ids_dims": []}
    if not hasattr(model, "vec_in_dim") or any(getattr(model, name, True) != value for name, value in flux1.items()):
        return False
    return _neo_blocks_in_flux1_form(model, modulation=True)


def _is_neo_chroma(model: Any) -> bool:
    """Neo's port of ComfyUI's Chroma: modulations from ``get_modulations``, Flux.1 blocks without
    modulation layers, no block skipped (``skip_mmdit``, ``skip_dit``)."""
    if not (hasattr(model, "get_modulations") and hasattr(model, "distilled_guidance_layer")):
        return False
    skips = getattr(model, "skip_mmdit", None), getattr(model, "skip_dit", None)
    return skips == ([], []) and _neo_blocks_in_flux1_form(model, modulation=False)


def _is_forge_main_flux(model: Any) -> bool:
    """Forge main's ``forward`` → ``inner_forward``, without reference latents (an older Neo had
    Kontext on that structure; NAG's run of ``forward`` would leave them out)."""
    return hasattr(model, "inner_forward") and "ref_latents" not in inspect.signature(type(model).forward).parameters


def is_flux_family(model: Any) -> bool:
    """Flux.1 or Chroma as Forge main builds them (``inner_forward``), or Flux.1 (Kontext too) or Chroma
    as Forge Neo's ComfyUI ports build them (``forward_orig``)."""
    if not is_joint_transformer(model):
        return False
    return (_is_neo_flux1(model) or _is_neo_chroma(model)) if _is_comfy_port(model) else _is_forge_main_flux(model)


class FluxPass(ForgeModelPass):
    """NAG on a Flux or Chroma model for one sampling pass (``nag_forward`` as the object patch).

    The NAG negative is encoded as a negative prompt: Neo's Flux engine, encoding a positive one, sets
    the Kontext references again (``dynamic_args.ref_latents``) from its stored references and its init
    image latent, which the host's own prompt has already consumed, so the img2img image would drop out
    of the references. Forge main's Flux and Chroma engines and Neo's Chroma engine do not read the flag."""

    encodes_as_negative_prompt = True
    modulations_of: ModulationsOf = staticmethod(flux1_or_chroma)

    def entry_point(self, model: torch.nn.Module) -> str:
        return entry_point(model)

    def nag_forward(self, model: torch.nn.Module) -> Forward:
        negative, active = self.weak(lambda nag_pass: nag_pass.nag.negative), self.weak(lambda nag_pass: nag_pass.active, False)
        return nag_forward(model, negative, self.params, active, self.nag.count(self.report), self.modulations_of)

    def hooked_text(self, model: torch.nn.Module) -> str:
        return f"{len(model.double_blocks)} double + {len(model.single_blocks)} single blocks"


def unsupported_joint_transformer(model: Any) -> str:
    """Why a Flux-like model that is not one of these is not run."""
    if is_joint_transformer(model):
        return f"NAG runs Forge's own Flux and Chroma models; this host's {type(model).__name__} is another one, not supported yet"
    return ""


FAMILY = ModelFamily("Flux", {FORGE: FluxPass}, is_flux_family, unsupported_joint_transformer)
