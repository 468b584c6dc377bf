"""One-time check, outside CI, that `rrg3d model import ctclip` reproduces CT-CLIP's own CTViT image encoder.

Needs the peer's code (github.com/ibrahimethemhamamci/CT-CLIP, transformer_maskgit/transformer_maskgit/{attention,
ctvit}.py copied into PEER_DIR/transformer_maskgit/ with an empty __init__.py; its hard-coded
torch.device('cuda') replaced by 'cpu'), vector-quantize-pytorch 1.1.2 and beartype on the path (DEPS_DIR; torchvision
may be a stand-in module: the encoder does not use it). No weights: the peer's CTViT is built with random weights at a
small size of the same structure, its state dict imported with rrg3d's table, and CTViT.forward(...,
return_encoded_tokens=True) compared with our encoder on the same volume.

    python scripts/check_ctclip_import.py PEER_DIR DEPS_DIR
"""

from __future__ import annotations

import sys

import torch


def main(peer_dir: str, deps_dir: str) -> int:
    sys.path[:0] = [peer_dir, deps_dir]
    from transformer_maskgit.ctvit import CTViT  # the peer's own code

    from rrg3d.models.peers import convert_peer

    torch.manual_seed(0)
    # CT-CLIP's real encoder: dim 512, image 480, patch 20 x 20, temporal patch 10, spatial 4 / temporal 4 layers
    peer = CTViT(dim=32, codebook_size=64, image_size=(12, 16), patch_size=4, temporal_patch_size=2, spatial_depth=1,
                 temporal_depth=2, dim_head=8, heads=2, use_vgg_and_gan=False).eval()
    with torch.no_grad():
        for name, parameter in peer.named_parameters():
            if "codebook" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)  # norms and biases away from their init
    state = {f"visual_transformer.{k}": v for k, v in peer.state_dict().items()}
    result = convert_peer("ctclip", state, options={"patch_size": [2, 4, 4], "input_shape": [8, 12, 16]})
    ours = result.encoder.eval()
    video = torch.randn(2, 1, 8, 12, 16)  # both: [B, C, D(t), H, W]
    with torch.no_grad():
        expected = peer(video, return_encoded_tokens=True)  # [B, t, h, w, d], after the vector quantiser
        got = ours(video)
        # before the quantiser: the peer's patch embedding + spatial/temporal transformers, ours without the VQ
        peer_tokens = peer.encode(peer.to_patch_emb(video))
        plain = convert_peer("ctclip", state, options={"patch_size": [2, 4, 4], "input_shape": [8, 12, 16],
                                                       "quantizer": False}).encoder.eval()
        ours_tokens = plain(video)
    same_code = (got - expected).abs().amax(-1) < 1e-4
    diff = (ours_tokens - peer_tokens).abs().max().item()
    scale = peer_tokens.abs().max().item()
    # a token whose two nearest codes are almost equally near may flip on float noise: count the near-ties
    codes = peer.vq._codebook.embed[0]
    distances = torch.cdist(peer_tokens.reshape(-1, codes.shape[-1]), codes)
    two = distances.topk(2, largest=False).values
    ties = int(((two[:, 1] - two[:, 0]) < 1e-3 * two[:, 1]).sum())
    print(f"CT-CLIP CTViT (peer code) vs rrg3d import: tokens {tuple(expected.shape)}; before the quantiser max |diff| "
          f"{diff:.3e} (max |token| {scale:.3f}); after it {int(same_code.sum())}/{same_code.numel()} tokens the same "
          f"code ({ties} near-ties); report: mapped {result.report['mapped']}, dropped {result.report['dropped']}, "
          f"filled {len(result.report['filled'])}")
    return 0 if diff <= 1e-4 * max(1.0, scale) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
