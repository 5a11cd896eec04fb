"""Inbound bounces and complaints: their records and the suppression policy applied to them."""
