"""Checking what users wrote: their formulas (:mod:`derive.check.formulas`, parsed by the
whitelist parser of :mod:`derive.check.parser`) and their hand-written backprop code
(:mod:`derive.check.backward`), against the derivation.
"""
