"""Masks room: prompt parsing, SAM2 video propagation (bounded memory), optical-flow fallback, mask ops."""
