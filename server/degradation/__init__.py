"""The VCISR degradation model as a library (``shared/spec/DEGRADATION.md``).

One video batch in, LR / HR / sharpened-HR pairs and one record per patch out,
as a pure function of (images, config, run seed, epoch, batch index).  The
engine runs every image stage as batched torch code on one device (CPU or
CUDA) and hands the uint8 frames of a V2 ending to a
:class:`~server.degradation.video.VideoCodec` it is given
(``server.codecs.VideoRoundTrip``).  This package imports nothing from
``server.codecs``, ``server.pipeline`` or ``server.service``.

    from server.codecs import VideoRoundTrip
    from server.degradation import DegradationConfig, Engine, ImageFolder, make_epoch_plan

    cfg = DegradationConfig()
    folder = ImageFolder("photos/", cfg.patch_size)
    plan = make_epoch_plan(folder.images, cfg, seed=0, epoch=0)
    batch = Engine(cfg, codec=VideoRoundTrip()).make_batch(folder, plan, 0)
"""

from server import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "DegradationConfig": ".config", "ConfigError": ".config", "PROFILES": ".config",
    "Engine": ".engine", "BatchResult": ".engine", "crop_patches": ".engine", "video_block": ".engine",
    "STAGES": ".engine",
    "EpochPlan": ".epoch_plan", "PatchRef": ".epoch_plan", "make_epoch_plan": ".epoch_plan",
    "ImageFolder": ".images", "ImageInfo": ".images", "decode_rgb8": ".images", "pack_folder": ".images",
    "PixelStore": ".pixel_store", "StoreError": ".pixel_store",
    "ensure_sample_data": ".sample_data",
    "VideoParams": ".video", "VideoCodec": ".video", "CodecError": ".video",
})
