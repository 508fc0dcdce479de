"""Scale-out planning without devices: per-device training memory estimates and the TPU slice recipes
they check. Import the submodules; this package imports nothing itself."""
