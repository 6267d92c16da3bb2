r"""PyTorch weights in and out of mim_jax.

  python -m mim_jax.convert --from=torch --arch=timm_vit in.pth OUT_WORKDIR \
      [--variant=base --patch_size=16 --image_size=224] [--which=teacher] [--norm=imagenet]
  python -m mim_jax.convert --to=timm WORKDIR out.safetensors [--encoder=online]

--arch: timm_vit | mae | beit | beitv2 | dino | ibot | torchvision_resnet. The workdir then works wherever a
pretraining run does (Trainer.from_workdir, config.finetune.pretrained, teacher keys,
python -m mim_jax.analysis). --arch=vqkd (BEiT v2's VQ-KD tokenizer) and --arch=dalle (DALL-E's
dVAE encoder, BEiT's) write a frozen tokenizer for --config.beit.tokenizer; --arch=torchvision_resnet
(a torchvision ResNet, running statistics included) a configs/finetune.py ResNet workdir;
--arch=swin | swinv2 (microsoft/Swin-Transformer and SimMIM weights) and --arch=mvitv2
(facebookresearch/mvit weights; SlowFast's video MViT and MaskFeat MaskMViT) a Swin or MViT v2
workdir. See docs/convert.md.
"""
from __future__ import annotations

import argparse
import sys

from mim_jax import convert


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mim_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from", dest="src", choices=["torch"], help="import a PyTorch checkpoint")
  p.add_argument("--to", dest="dst", choices=["timm"], help="export a workdir's encoder for timm")
  p.add_argument("input",
                 help="checkpoint (.pth/.pt/.safetensors) with --from, a workdir with --to")
  p.add_argument("output", help="a new workdir with --from, a .safetensors file with --to")
  p.add_argument("--arch", default="", help=f"with --from: one of {', '.join(convert.ARCHS)}")
  p.add_argument("--which", default="teacher", help="dino / ibot: 'teacher' or 'student'")
  p.add_argument("--variant", default="",
                 help="check the width against a ViT variant (tiny/small/base/large/huge)")
  p.add_argument("--patch_size", type=int, default=0, help="check the patch size")
  p.add_argument("--image_size", type=int, default=0,
                 help="image size (needed when the weights have no position table)")
  p.add_argument("--decoder_heads", type=int, default=16,
                 help="mae: decoder heads (16 in every official MAE)")
  p.add_argument("--norm", default="",
                 help="input mean/std of the config: imagenet | inception (default per arch)")
  p.add_argument("--preset", default="",
                 help="preset of configs/mae.py, simmim.py or (vqkd) vqkd.py (default: the "
                      "embedded data)")
  p.add_argument("--config_dir", default="",
                 help="the checkout's configs/ directory (found automatically)")
  p.add_argument("--reader", default="pure",
                 help="pure (no torch, default) or torch (torch.load weights_only=True)")
  p.add_argument("--encoder", default="online", help="with --to: online | ema | teacher")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if bool(args.src) == bool(args.dst):
    print("error: give exactly one of --from=torch (import) or --to=timm (export)", file=sys.stderr)
    return 2
  try:
    if args.src:
      if not args.arch:
        raise convert.ConversionError(
            f"--from=torch needs --arch (one of {', '.join(convert.ARCHS)})")
      info = convert.convert_torch_checkpoint(
          args.input, args.output, args.arch, which=args.which, variant=args.variant,
          patch_size=args.patch_size, image_size=args.image_size, decoder_heads=args.decoder_heads,
          preset=args.preset, norm=args.norm, config_dir=args.config_dir, reader=args.reader)
      spec = info.get("spec", {})
      size = spec.get("grid", 0) * spec.get("patch", 0)
      if info.get("arch") in ("swin", "swinv2"):
        print(f"wrote {args.output}: method {info.get('method')}, Swin v{spec.get('version')} "
              f"embed {spec.get('embed_dim')} depths {spec.get('depths')} window "
              f"{spec.get('window_size')} at {spec.get('image_size')}px")
      elif info.get("arch") == "mvitv2":
        frames = f", {spec['num_frames']} frames" if spec.get("num_frames") else ""
        print(f"wrote {args.output}: method {info.get('method')}, MViT v2 blocks "
              f"{spec.get('stage_blocks')} width {spec.get('embed_dim')} query strides "
              f"{spec.get('stage_strides')}{frames}")
      elif info.get("arch") == "torchvision_resnet":
        print(f"wrote {args.output}: method {info.get('method')}, ResNet-{spec.get('depth')} "
              f"width {spec.get('width')} ({spec.get('stem')} stem, {spec.get('num_classes')} "
              f"classes)")
      else:
        net = (f"ViT width {spec.get('width')} depth {spec.get('depth')}" if "width" in spec else
               f"DALL-E encoder {info.get('dalle_spec')}")
        print(f"wrote {args.output}: method {info.get('method')}, {net} patch {spec.get('patch')} "
              f"at {size}px")
      if info.get("ignored_keys"):
        print(f"  left out of the checkpoint: {convert._fmt(info['ignored_keys'])}")
      if info.get("initialised_not_converted"):
        kept = convert._fmt(info["initialised_not_converted"])
        print(f"  kept from the seeded initialisation: {kept}")
      if info.get("method") == "tokenizer":
        codes = f"codebook {info.get('codebook_size')}"
        if "decoder_spec" in info:
          codes += (f" x {info.get('code_dim')}, decoder depth "
                    f"{info['decoder_spec'].get('depth')}")
        print(f"  {codes}; use it as a frozen tokenizer, e.g. --config.beit.tokenizer={args.output}")
      else:
        print(f"  use it as a pretrained run, e.g. --config.finetune.pretrained={args.output}")
    else:
      name, kwargs, sd = convert.export_timm(args.input, args.output, args.encoder)
      kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
      print(f"wrote {len(sd)} tensors to {args.output}; load them with\n"
            f"  timm.create_model({name!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={args.output!r}){kw})")
  except (convert.ConversionError, convert.CheckpointReadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
