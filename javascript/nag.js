// Tooltips for the NAG accordion. The WebUI's hints.js looks tooltips up by the visible text
// of a label in its global `titles` object, which extension scripts may extend.
(function () {
    const nagTitles = {
        "NAG": "Normalized Attention Guidance: pushes every cross-attention output (Flux, Chroma, SD3: every joint attention's image part) away from the one computed with the NAG negative prompt. Works at CFG 1 (Turbo, Lightning, DMD2, LCM, SD3.5 Turbo, Flux), where the normal negative prompt does nothing.",
        "NAG preset": "Fills scale, tau, alpha, start, end and sigma end with values from the NAG authors for a kind of model (SD1.5, SDXL, few-step, Flux, Chroma, SD3.5 Turbo, Wan). Tune only the scale afterwards. Shows Custom when the numbers match no preset.",
        "NAG negative prompt": "What NAG steers away from. Empty: the main negative prompt. Emphasis, embeddings, BREAK and [from:to:step] work as in the main prompt; <lora:...> tags are ignored.",
        "NAG scale": "Strength. Same convention as the NAG authors' code: 1 = no guidance; the paper's phi is scale - 1 (paper phi 2 = scale 3). SD1.5: about 5; SDXL at 20+ steps: above 6; few-step models: about 3.",
        "NAG tau": "Cap on how far guidance may move each token: the guided output's L1 norm is kept at most tau times the positive one's. Lower it if images burn or break up.",
        "NAG alpha": "Blend between the guided output (1) and the unguided one (0). Lower it (with tau) for fine-tuned or v-pred models that degrade.",
        "NAG start": "Fraction of the sampling steps after which NAG starts (0 = from the first step).",
        "NAG end": "Fraction of the sampling steps at which NAG stops (1 = to the last step). NAG acts mostly in the early steps; ending earlier saves time.",
        "NAG sigma end": "NAG also stops at the first step whose noise level (sigma) is below this value, whatever the scheduler, shift and step count: the NAG authors' nag_sigma_end (0.75 for Flux, Chroma, SD3.5 and fast Wan; 4 for SD1.5). 0 = no sigma limit. A hires or img2img pass that starts below it is not guided.",
        "NAG hires": "Whether NAG runs in the first pass, the hires-fix pass, or both.",
    };
    if (typeof titles !== "undefined") {
        Object.assign(titles, nagTitles);
    }
})();
