"""The numbers the over-fit diagnosis judges by, each with why, in one place (`Thresholds.table()` lists them).

They are starting points, not calibrations: sdtune's tests build their models in code and download nothing,
so no value here was fitted on real fine-tunes. Every report prints the measured number beside its threshold,
so a user can judge a borderline case; faces and the API may pass other values (`DiagnoseConfig.thresholds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# Neutral prompts no LoRA or fine-tune trains on: if the text encoder reads these differently, it drifted.
CONTROL_PROMPTS: tuple[str, ...] = (
    "a photograph of a cat sitting on a sofa",
    "a mountain landscape with a lake at sunrise",
    "a red car parked on a city street",
    "a bowl of fruit on a wooden table",
    "portrait of an old man with a grey beard",
    "a lighthouse on a rocky coast at night",
    "a bicycle leaning against a brick wall",
    "a cup of coffee next to an open book",
    "a forest path in autumn, fallen leaves",
    "a dog running on a sandy beach",
    "a plate of sushi, top view",
    "an astronaut floating above the earth",
)


def _why(text: str) -> dict:
    return {"why": text}


@dataclass(frozen=True)
class Thresholds:
    """When a verdict triggers; `table()` gives name, value and reason of each."""

    control_cosine: float = field(default=0.95, metadata=_why(
        "mean token-by-token cosine of the control prompts, base vs tuned text encoder; below it the encoder reads "
        "ordinary prompts differently from the base ('language drift', the TE over-fits first). A TE trained at "
        "the usual LoRA rates moves these prompts little; a replaced or over-trained TE moves them far"))
    collapse: float = field(default=0.5, metadata=_why(
        "share of the base model's distinctness between different tags that the tuned encoder lost: "
        "(similarity tuned - similarity base) / (1 - similarity base). Above one half, tags read more alike than "
        "different ('tags stop working'); 0 means unchanged, 1 fully collapsed"))
    unet_block_delta: float = field(default=0.3, metadata=_why(
        "largest relative weight change ‖ΔW‖/‖W‖ of one U-Net block (merge/LBW block names); above it that block "
        "moved about a third of its own size away from the base, where odd details and thick lines come from. The "
        "suggested strength / merge-back ratio is the one that brings that block down to this value"))
    lora_te_scales: tuple[float, ...] = field(default=(0.75, 0.5, 0.25), metadata=_why(
        "the text-encoder scales a LoRA diagnosis tries (largest first) when its TE verdicts trigger; the largest "
        "that passes both TE thresholds is suggested for `repair lora-te --scale`, none passing suggests --strip"))
    validation_tie: float = field(default=0.01, metadata=_why(
        "epoch picker: epochs whose validation loss is within this share of the best one count as tied, and the "
        "earliest of them is kept (the same loss with less training is less over-fitted)"))

    def table(self) -> list[dict]:
        """[{name, value, why}] for every threshold, for reports and help texts."""
        return [{"name": f.name, "value": getattr(self, f.name), "why": f.metadata["why"]} for f in fields(self)]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
