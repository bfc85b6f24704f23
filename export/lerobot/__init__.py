"""LeRobot datasets (v3.0 and v2.1) in and out: a workstation-side data source for training, offline
distillation, INT8 calibration, normalization statistics and open-loop checks. Never imported by the
robot runtime; needs pyarrow and av (the `export` extra)."""

from .errors import LeRobotDatasetError
from .layout import DatasetMeta, open_meta
from .reader import RecordedDataset, SourceSpec, is_lerobot_source, load_dataset, parse_source
from .writer import write_dataset

__all__ = ["DatasetMeta", "LeRobotDatasetError", "RecordedDataset", "SourceSpec", "is_lerobot_source",
           "load_dataset", "open_meta", "parse_source", "write_dataset"]
