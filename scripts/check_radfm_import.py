"""One-time check, outside CI, that `rrg3d model import radfm` reproduces RadFM's own 3D ViT.

Needs the peer's code (github.com/chaoyi-wu/RadFM, src/Model/RadFM/{vit_3d,position_encoding}.py, copied into a
package folder given as PEER_DIR) and einops; no weights: the peer's ViT is built with random weights at a small size
of the same structure, its state dict is imported with rrg3d's table, and both encoders run on the same volume
(three identical channels for the peer, one for ours).

    python scripts/check_radfm_import.py PEER_DIR
"""

from __future__ import annotations

import sys

import torch


def main(peer_dir: str) -> int:
    sys.path.insert(0, peer_dir)
    from radfm.vit_3d import ViT  # the peer's own code

    from rrg3d.models.peers import convert_peer

    torch.manual_seed(0)
    # RadFM's real encoder: image 512, frames 512, patch 32 x 32 x 4, dim 768, depth 12, heads 12, dim_head 64
    peer = ViT(image_size=32, image_patch_size=8, frames=16, frame_patch_size=4, dim=96, depth=2, heads=4,
               mlp_dim=192, channels=3, dim_head=64).eval()
    for parameter in peer.parameters():  # LayerNorms start at 1/0: randomise everything
        torch.nn.init.normal_(parameter, std=0.2)
    state = {f"embedding_layer.vision_encoder.{k}": v for k, v in peer.state_dict().items()}
    result = convert_peer("radfm", state, options={"patch_size": [4, 8, 8], "input_shape": [16, 32, 32],
                                                   "heads": 4, "dim_head": 64})
    ours = result.encoder.eval()
    volume = torch.randn(2, 1, 16, 32, 32)  # ours: [B, 1, D, H, W]
    with torch.no_grad():
        expected, _ = peer(volume.permute(0, 1, 3, 4, 2).repeat(1, 3, 1, 1, 1))  # RadFM: [B, 3, H, W, D]
        got = ours(volume)  # [B, d, h, w, C]
    got = got.permute(0, 2, 3, 1, 4).reshape(expected.shape)  # RadFM's token order: (h w d)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"RadFM ViT (peer code) vs rrg3d import: tokens {tuple(expected.shape)}, max |diff| {diff:.3e} "
          f"(max |output| {scale:.3f}); report: mapped {result.report['mapped']}, dropped {result.report['dropped']}, "
          f"filled {result.report['filled']}")
    return 0 if diff <= 1e-4 * max(1.0, scale) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
