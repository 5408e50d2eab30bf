"""Real datasets and LightningDataModules. Items are dicts: ``image`` (C, H, W) or ``video`` (C, T, H, W) in [-1, 1],
plus ``label`` / ``caption`` where the data has them. Unreadable files are skipped with a warning and counted."""

from gencore.data._robust import DataReadError
from gencore.data.datamodules import (
    DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SkimagePhotosDataModule,
    VideoDataModule,
)
from gencore.data.fashion_mnist import CLASS_NAMES, FashionMNIST, caption_for, find_fashion_mnist, load_fashion_mnist
from gencore.data.images import SKIMAGE_PHOTOS, ImageFolder, SkimagePhotos, load_image, resize_center_crop
from gencore.data.pairs import EDITS, InstructionEdits, MaskedImages, apply_edit
from gencore.data.video import (
    OPENCV_SAMPLE_VIDEOS,
    VideoClips,
    opencv_sample_videos,
    read_frames,
    video_info,
    write_video,
)

__all__ = [
    "CLASS_NAMES",
    "EDITS",
    "OPENCV_SAMPLE_VIDEOS",
    "SKIMAGE_PHOTOS",
    "DataModule",
    "DataReadError",
    "FashionMNIST",
    "FashionMNISTDataModule",
    "ImageFolder",
    "ImageFolderDataModule",
    "InstructionEdits",
    "MaskedImages",
    "SkimagePhotos",
    "SkimagePhotosDataModule",
    "VideoClips",
    "VideoDataModule",
    "apply_edit",
    "caption_for",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_image",
    "opencv_sample_videos",
    "read_frames",
    "resize_center_crop",
    "video_info",
    "write_video",
]
