"""The text objectives on masked captions (docs/methods/harmony.md 2.4-2.5): MLM through a causal decoder and text
self-distillation from the EMA text teacher, either or both. They share one student forward on the masked
captions, hence one backward pass. MaskCLIP uses the MLM term alone."""

import torch

from model.decoders import MLMDecoder
from model.heads import text_distillation_head
from model.losses import mlm_loss, text_distillation_loss
from model.masking import MASK_ID, mask_captions, real_token_mask
from model.objectives.objective import Objective, register, update_center

MLM_LOGIT_CHUNKS = 8  # the MLM logits of a step in 8 parts: (n, 49409) floats would be the text group's peak


@register
class MaskedText(Objective):
    name = "text"
    build_rank, pass_rank = 40, 60
    students = ("text_student",)
    reads = ("tokens",)

    @classmethod
    def enabled(cls, config):
        return config.mlm or config.text_distillation

    @property
    def teachers(self):
        return ("text_student", "text_distillation_head") if self.config.text_distillation else ()

    @property
    def schedules(self):
        return ("teacher_patch_temp",) if self.config.text_distillation else ()

    def networks(self, config, model):
        networks = {}
        if config.mlm:
            networks["mlm_decoder"] = lambda: MLMDecoder(MASK_ID + 1, config.text_width, config.mlm_decoder_depth,
                                                         config.mlm_decoder_heads)
        if config.text_distillation:
            networks["text_distillation_head"] = lambda: text_distillation_head(
                config.text_width, config.text_distillation_out_dim, config.text_distillation_head_hidden_dim,
                config.head_bottleneck_dim)
        return networks

    def buffers(self, config):
        return {"text_center": torch.zeros(1, 1, config.text_distillation_out_dim)} if config.text_distillation else {}

    def teacher_outputs(self, model, seen, views):
        """text_features (B, T, width): the teacher's token features of the raw captions."""
        return {"text_features": seen["text_features"]} if self.config.text_distillation else {}

    def passes(self, model, views, teacher, values):
        config, tokens = self.config, views["tokens"]
        masked_tokens, labels, masked = mask_captions(tokens, config.mlm_probability)
        _, features = model.text_student(masked_tokens)  # (B, T, width), before the final norm
        at_masked = masked.nonzero(as_tuple=True)  # ((M,) caption, (M,) position) of each masked token: one host read
        losses, stats = [], {}
        if config.mlm:
            # Logits at the masked positions only, a chunk at a time: the same loss without the (B, T, 49409) tensor.
            loss, mlm_stats = mlm_loss(model.mlm_decoder(features)[at_masked], labels[at_masked],
                                       model.mlm_decoder.predict, MLM_LOGIT_CHUNKS)
            losses.append(config.mlm_weight * loss)
            stats.update(mlm_stats)
        if config.text_distillation:
            with torch.no_grad():  # every token: the centre reads the real ones
                teacher_tokens = model.teachers["text_distillation_head"](teacher.pop("text_features"))  # (B, T, K)
            loss, distillation_stats = text_distillation_loss(
                model.text_distillation_head(features[at_masked]), teacher_tokens, at_masked,  # the loss's rows only
                real_token_mask(tokens), model.text_center, values["teacher_patch_temp"], config.student_temp)
            update_center(model.text_center, distillation_stats.pop("teacher_token_sum"), config.center_momentum,
                          divide_by=distillation_stats.pop("teacher_token_count"))
            losses.append(config.text_distillation_weight * loss)
            stats.update(distillation_stats)
        yield sum(losses), stats
