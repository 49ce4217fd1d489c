"""The structures `tm_decode_layer` (decode_layer.c) takes, field for field as the C declares them."""

from __future__ import annotations

import ctypes

FORMAT_INT8 = 0  # LayerWeight.format of int8_linear.c's weights; block formats: cpu.BLOCK_FORMATS


class LayerWeight(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("format", ctypes.c_int64),
    ]


class DecoderLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_attention_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("qkv", LayerWeight),
        ("o", LayerWeight),
        ("gate_up", LayerWeight),
        ("down", LayerWeight),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("num_heads", ctypes.c_int64),
        ("num_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("kv_format", ctypes.c_int),
    ]


class DecodeStep(ctypes.Structure):
    _fields_ = [
        ("num_seqs", ctypes.c_int64),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64),
        ("seq_lens", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
    ]
