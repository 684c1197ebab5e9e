"""Three-stage distillation (METHOD.md §3) and hybrid placement (§4)."""
