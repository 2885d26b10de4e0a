"""Generation with transformers `generate` on the training model itself.

The engine holds a reference to the trainer's module, so its weights are the trainer's weights:
`sync_weights` has nothing to copy. Prompts are left-padded into one batch per call.
"""

from __future__ import annotations

from typing import Any

import torch

from fastrl.rollout.types import GenOutput, Sampling


class HFEngine:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, *, max_batch: int = 256):
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        request_ids: list[str] | None = None,
    ) -> list[GenOutput]:
        outputs: list[GenOutput] = []
        # Sorting by length keeps left padding small inside each chunk.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        by_index: dict[int, GenOutput] = {}
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            for i, out in zip(chunk, self._generate_batch([prompts[i] for i in chunk], sampling)):
                by_index[i] = out
        outputs = [by_index[i] for i in range(len(prompts))]
        return outputs

    def _generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> list[GenOutput]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        greedy = sampling.temperature <= 0
        was_training = self.model.training
        self.model.eval()
        try:
            result = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=sampling.max_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                eos_token_id=sampling.stop_token_id,
                pad_token_id=self.pad_token_id,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=True,
            )
        finally:
            self.model.train(was_training)
        new_ids = result.sequences[:, width:].cpu()  # [B, S]
        scale = 1.0 if greedy else 1.0 / sampling.temperature
        logits = torch.stack(result.logits, dim=1).float() * scale  # [B, S, V]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_ids.unsqueeze(-1).to(logits.device))
        logprobs = logprobs.squeeze(-1).cpu()  # [B, S]
        outs = []
        for row in range(len(prompts)):
            ids = new_ids[row].tolist()
            n = len(ids)
            finished = False
            if sampling.stop_token_id is not None and sampling.stop_token_id in ids:
                n = ids.index(sampling.stop_token_id) + 1
                finished = True
            outs.append(GenOutput(ids[:n], logprobs[row, :n].tolist(), finished))
        return outs

    def sync_weights(self, named_tensors: Any = None) -> None:
        """Nothing to copy: generation runs on the trainer's own parameters."""

    def sleep(self) -> None:
        """No cache to release between calls."""

    def wake(self) -> None:
        """No cache to restore."""
