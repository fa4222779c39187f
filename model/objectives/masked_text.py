"""The text objectives on masked captions (docs/methods/harmony.md 2.4-2.5): MLM through a causal decoder (`mlm`) and
text self-distillation from the EMA text teacher (`distillation`), either or both. They share one student forward on
the masked captions, hence one backward pass. MaskCLIP uses the MLM term alone."""

from dataclasses import dataclass

import torch

from model.decoders import MLMDecoder
from model.heads import text_distillation_head
from model.losses import mlm_loss, text_distillation_loss
from model.masking import MASK_ID, mask_captions, real_token_mask
from model.objectives.objective import MASK_NOTE, WEIGHT_NOTE, Objective, register, update_center
from model.ranges import ranged

MLM_LOGIT_CHUNKS = 8  # the MLM logits of a step in 8 parts: (n, 49409) floats would be the text group's peak


@register
class MaskedText(Objective):
    """Text self-distillation's teacher temperature is optim.teacher_patch_temp (Harmony's code)."""

    @dataclass
    class Settings:
        mlm: bool = True  # masked language modelling through a causal decoder
        distillation: bool = True  # masked captions distilled from the EMA text teacher
        mask_probability: float = ranged(0.2, "(0, 1)", note=MASK_NOTE)
        mlm_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        distillation_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        mlm_decoder_depth: int = ranged(4, "[1, inf)")  # the MLM decoder's blocks (its width is model.text_width)
        mlm_decoder_heads: int = ranged(8, "[1, inf)")  # the MLM decoder's attention heads
        distillation_out_dim: int = ranged(2048, "[1, inf)")  # the distillation head's output dimension
        distillation_head_hidden_dim: int = ranged(1024, "[1, inf)")  # the distillation head's MLP width
        bottleneck_dim: int = ranged(256, "[1, inf)")  # the distillation head's L2-normalized bottleneck
        student_temp: float = ranged(0.1, "(0, inf)")  # the student's softmax temperature
        center_momentum: float = ranged(0.9, "[0, 1]")  # EMA momentum of the teacher's output centre

    name = "masked_text"
    build_rank, pass_rank = 40, 60
    students = ("text_student",)
    reads = ("tokens",)

    @classmethod
    def check(cls, settings, model_config):
        if not (settings.mlm or settings.distillation):
            raise ValueError("model.objectives.masked_text: mlm and distillation are both false: set one true, or "
                             "leave masked_text out (model.objectives.masked_text=false)")

    @property
    def teachers(self):
        return ("text_student", "text_distillation_head") if self.settings.distillation else ()

    @property
    def schedules(self):
        return ("teacher_patch_temp",) if self.settings.distillation else ()

    def attention_heads(self):
        return [("mlm_decoder_heads", self.settings.mlm_decoder_heads, "model.text_width",
                 self.model_config.text_width)] if self.settings.mlm else []

    def networks(self, model):
        settings, width, networks = self.settings, self.model_config.text_width, {}
        if settings.mlm:
            networks["mlm_decoder"] = lambda: MLMDecoder(MASK_ID + 1, width, settings.mlm_decoder_depth,
                                                         settings.mlm_decoder_heads)
        if settings.distillation:
            networks["text_distillation_head"] = lambda: text_distillation_head(
                width, settings.distillation_out_dim, settings.distillation_head_hidden_dim, settings.bottleneck_dim)
        return networks

    def buffers(self):
        if not self.settings.distillation:
            return {}
        return {"text_center": torch.zeros(1, 1, self.settings.distillation_out_dim)}

    def teacher_outputs(self, model, seen, views):
        """text_features (B, T, width): the teacher's token features of the raw captions."""
        return {"text_features": seen["text_features"]} if self.settings.distillation else {}

    def passes(self, model, views, teacher, values):
        settings, tokens = self.settings, views["tokens"]
        masked_tokens, labels, masked = mask_captions(tokens, settings.mask_probability)
        _, features = model.text_student(masked_tokens)  # (B, T, width), before the final norm
        at_masked = masked.nonzero(as_tuple=True)  # ((M,) caption, (M,) position) of each masked token: one host read
        losses, stats = [], {}
        if settings.mlm:
            # Logits at the masked positions only, a chunk at a time: the same loss without the (B, T, 49409) tensor.
            loss, mlm_stats = mlm_loss(model.mlm_decoder(features)[at_masked], labels[at_masked],
                                       model.mlm_decoder.predict, MLM_LOGIT_CHUNKS)
            losses.append(settings.mlm_weight * loss)
            stats.update(mlm_stats)
        if settings.distillation:
            with torch.no_grad():  # every token: the centre reads the real ones
                teacher_tokens = model.teachers["text_distillation_head"](teacher.pop("text_features"))  # (B, T, K)
            loss, distillation_stats = text_distillation_loss(
                model.text_distillation_head(features[at_masked]), teacher_tokens, at_masked,  # the loss's rows only
                real_token_mask(tokens), model.text_center, values["teacher_patch_temp"], settings.student_temp)
            update_center(model.text_center, distillation_stats.pop("teacher_token_sum"), settings.center_momentum,
                          divide_by=distillation_stats.pop("teacher_token_count"))
            losses.append(settings.distillation_weight * loss)
            stats.update(distillation_stats)
        yield sum(losses), stats
