from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ("seed", "epoch", "config_overrides_json", "include_dataset_files")
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_OVERRIDES_JSON_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DATASET_FILES_FIELD_NUMBER: _ClassVar[int]
    seed: int
    epoch: int
    config_overrides_json: str
    include_dataset_files: bool
    def __init__(self, seed: _Optional[int] = ..., epoch: _Optional[int] = ..., config_overrides_json: _Optional[str] = ..., include_dataset_files: _Optional[bool] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "dataset_name", "num_images", "num_skipped_images", "patches_per_epoch", "batches_per_epoch", "scale", "hr_patch_size", "lr_patch_size", "video_batch_size", "codec_backends", "device", "profile", "default_config_json", "max_streams", "max_indices_per_request", "workers", "dataset_fingerprint", "dataset_files", "config_json", "cpu_budget_cores", "cpu_budget", "shared_memory_probe")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PATCHES_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    HR_PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_INDICES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DATASET_FILES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CPU_BUDGET_CORES_FIELD_NUMBER: _ClassVar[int]
    CPU_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_PROBE_FIELD_NUMBER: _ClassVar[int]
    version: str
    dataset_name: str
    num_images: int
    num_skipped_images: int
    patches_per_epoch: int
    batches_per_epoch: int
    scale: int
    hr_patch_size: int
    lr_patch_size: int
    video_batch_size: int
    codec_backends: _containers.RepeatedScalarFieldContainer[str]
    device: str
    profile: str
    default_config_json: str
    max_streams: int
    max_indices_per_request: int
    workers: int
    dataset_fingerprint: str
    dataset_files: _containers.RepeatedCompositeFieldContainer[DatasetFile]
    config_json: str
    cpu_budget_cores: int
    cpu_budget: str
    shared_memory_probe: str
    def __init__(self, version: _Optional[str] = ..., dataset_name: _Optional[str] = ..., num_images: _Optional[int] = ..., num_skipped_images: _Optional[int] = ..., patches_per_epoch: _Optional[int] = ..., batches_per_epoch: _Optional[int] = ..., scale: _Optional[int] = ..., hr_patch_size: _Optional[int] = ..., lr_patch_size: _Optional[int] = ..., video_batch_size: _Optional[int] = ..., codec_backends: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., profile: _Optional[str] = ..., default_config_json: _Optional[str] = ..., max_streams: _Optional[int] = ..., max_indices_per_request: _Optional[int] = ..., workers: _Optional[int] = ..., dataset_fingerprint: _Optional[str] = ..., dataset_files: _Optional[_Iterable[_Union[DatasetFile, _Mapping]]] = ..., config_json: _Optional[str] = ..., cpu_budget_cores: _Optional[int] = ..., cpu_budget: _Optional[str] = ..., shared_memory_probe: _Optional[str] = ...) -> None: ...

class DatasetFile(_message.Message):
    __slots__ = ("name", "size", "blake2b", "width", "height")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BLAKE2B_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    blake2b: str
    width: int
    height: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., blake2b: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("seed", "epoch", "index_list", "index_range", "include_hr", "include_hr_usm", "config_overrides_json", "max_chunk_bytes", "shared_memory", "shared_memory_token")
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEX_LIST_FIELD_NUMBER: _ClassVar[int]
    INDEX_RANGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HR_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HR_USM_FIELD_NUMBER: _ClassVar[int]
    CONFIG_OVERRIDES_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    seed: int
    epoch: int
    index_list: IndexList
    index_range: IndexRange
    include_hr: bool
    include_hr_usm: bool
    config_overrides_json: str
    max_chunk_bytes: int
    shared_memory: bool
    shared_memory_token: bytes
    def __init__(self, seed: _Optional[int] = ..., epoch: _Optional[int] = ..., index_list: _Optional[_Union[IndexList, _Mapping]] = ..., index_range: _Optional[_Union[IndexRange, _Mapping]] = ..., include_hr: _Optional[bool] = ..., include_hr_usm: _Optional[bool] = ..., config_overrides_json: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., shared_memory_token: _Optional[bytes] = ...) -> None: ...

class IndexList(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...

class IndexRange(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PairChunk(_message.Message):
    __slots__ = ("seed", "epoch", "batch_index", "batch_size", "first_patch", "lr", "hr", "hr_usm", "patch_ids", "records_json", "last_chunk", "batch_error", "dataset_fingerprint", "shared_memory_probe", "slot")
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIRST_PATCH_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    HR_FIELD_NUMBER: _ClassVar[int]
    HR_USM_FIELD_NUMBER: _ClassVar[int]
    PATCH_IDS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    LAST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    BATCH_ERROR_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_PROBE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    seed: int
    epoch: int
    batch_index: int
    batch_size: int
    first_patch: int
    lr: Tensor
    hr: Tensor
    hr_usm: Tensor
    patch_ids: _containers.RepeatedScalarFieldContainer[str]
    records_json: _containers.RepeatedScalarFieldContainer[str]
    last_chunk: bool
    batch_error: str
    dataset_fingerprint: str
    shared_memory_probe: str
    slot: SharedSlot
    def __init__(self, seed: _Optional[int] = ..., epoch: _Optional[int] = ..., batch_index: _Optional[int] = ..., batch_size: _Optional[int] = ..., first_patch: _Optional[int] = ..., lr: _Optional[_Union[Tensor, _Mapping]] = ..., hr: _Optional[_Union[Tensor, _Mapping]] = ..., hr_usm: _Optional[_Union[Tensor, _Mapping]] = ..., patch_ids: _Optional[_Iterable[str]] = ..., records_json: _Optional[_Iterable[str]] = ..., last_chunk: _Optional[bool] = ..., batch_error: _Optional[str] = ..., dataset_fingerprint: _Optional[str] = ..., shared_memory_probe: _Optional[str] = ..., slot: _Optional[_Union[SharedSlot, _Mapping]] = ...) -> None: ...

class SharedSlot(_message.Message):
    __slots__ = ("kind", "path", "lease", "size", "tensors", "timeout_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    lease: int
    size: int
    tensors: _containers.RepeatedCompositeFieldContainer[SlotTensor]
    timeout_ms: int
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., lease: _Optional[int] = ..., size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[SlotTensor, _Mapping]]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class SlotTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class SlotRelease(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, leases: _Optional[_Iterable[int]] = ...) -> None: ...

class SlotReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
