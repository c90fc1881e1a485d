"""One UNet call with the LoRA on some rows equals the pretrained and the fine-tuned calls made apart: outputs, input
gradients and LoRA gradients. This is what lets the stacked pass structure batch P_F^# with P_F."""

from __future__ import annotations

import pytest
import torch

from gflowdiff.diffusion.policy import DiffusionPolicy, LoRAConfig


def policy_with_live_lora(model: str, tiny_sd_path) -> tuple[DiffusionPolicy, float, int]:
    """A policy whose LoRA changes the output (B = 0 at init would make every check vacuous); also its CFG scale and
    latent size."""
    if model == "tiny-sd":
        policy, guidance = DiffusionPolicy(str(tiny_sd_path)), 3.0
    else:  # LoRA on the ResNet convolutions too (4-D layer outputs), as the digits configs do
        lora = LoRAConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
        policy, guidance = DiffusionPolicy("embedded:digits", lora=lora), 1.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return policy, guidance, policy.latent_size


def predict(policy, x, guidance, lora_rows=None):
    """ε̂ of rows whose prompt and timestep repeat every 3 rows, so rows i and i + 3 are the same input."""
    n = len(x)
    embeds = policy.encode_prompts((["a cat", "a red cow", "a dog"] * 2)[:n])
    negative = policy.encode_prompts([""] * n)
    t = torch.tensor([900, 500, 20] * 2)[:n]
    return policy.kernel_output(x, t, embeds, negative, guidance, lora_rows=lora_rows)


@pytest.mark.parametrize("model", ["tiny-sd", "digits-conv-lora"])
def test_masked_rows_equal_separate_calls(tiny_sd_path, model):
    torch.manual_seed(0)
    policy, guidance, size = policy_with_live_lora(model, tiny_sd_path)
    channels = policy.latent_channels
    x = torch.randn(3, channels, size, size)
    cotangent = torch.randn(3, channels, size, size)

    def output_and_gradients(stacked: bool):
        policy.unet.zero_grad(set_to_none=True)
        if stacked:  # rows [x (LoRA off); x (LoRA on)] in one call
            leaf = torch.cat([x, x]).requires_grad_(True)
            eps = predict(policy, leaf, guidance, lora_rows=torch.tensor([False] * 3 + [True] * 3))
            pretrained, tuned = eps.chunk(2)
            (pretrained * cotangent).sum().backward(retain_graph=True)
            input_grad_pretrained = leaf.grad[:3].clone()
            lora_grads_of_pretrained_rows = [
                None if p.grad is None else p.grad.clone() for p in policy.lora_parameters()
            ]
            (tuned * cotangent).sum().backward()
            input_grad_tuned = leaf.grad[3:].clone()
        else:
            leaf_pretrained = x.clone().requires_grad_(True)
            with policy.reference():
                pretrained = predict(policy, leaf_pretrained, guidance)
            (pretrained * cotangent).sum().backward()
            input_grad_pretrained = leaf_pretrained.grad
            lora_grads_of_pretrained_rows = None
            leaf_tuned = x.clone().requires_grad_(True)
            tuned = predict(policy, leaf_tuned, guidance)
            (tuned * cotangent).sum().backward()
            input_grad_tuned = leaf_tuned.grad
        lora_grads = [p.grad.clone() for p in policy.lora_parameters()]
        return pretrained, tuned, input_grad_pretrained, input_grad_tuned, lora_grads, lora_grads_of_pretrained_rows

    apart = output_and_gradients(stacked=False)
    together = output_and_gradients(stacked=True)
    lora_effect = (apart[1] - apart[0]).abs().max()
    assert lora_effect > 1e-3  # the two policies differ, so equality below means the mask worked row by row
    names = ["pretrained", "tuned", "input grad pretrained", "input grad tuned"]
    for name, a, b in zip(names, apart[:4], together[:4], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()), msg=name)
    for a, b in zip(apart[4], together[4], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    # the backward from the LoRA-off rows alone gives every LoRA parameter exactly zero gradient
    assert all(g is None or not g.any() for g in together[5])


def test_mask_is_off_outside_its_context_and_row_count_checked(tiny_sd_path):
    policy, guidance, size = policy_with_live_lora("tiny-sd", tiny_sd_path)
    x = torch.randn(2, policy.latent_channels, size, size)
    with torch.no_grad():
        plain = predict(policy, x, guidance)
        predict(policy, x, guidance, lora_rows=torch.tensor([True, False]))
        assert policy.lora_row_mask.rows_on is None
        torch.testing.assert_close(predict(policy, x, guidance), plain, rtol=0, atol=0)  # the LoRA is back on all rows
        with pytest.raises(ValueError, match="a mask of 3 rows for a LoRA layer output of 4 rows"):
            with policy.lora_row_mask.only(torch.tensor([True, False, True])):
                policy.unet(x.repeat(2, 1, 1, 1), torch.tensor([1] * 4), encoder_hidden_states=torch.zeros(4, 77, 32))
        assert policy.lora_row_mask.rows_on is None  # off after the error too
