"""The workflow's stages, one module per workflow/rules/<stage>.smk (baselines.smk: the baselines
package), each with `add_arguments(parser)` and `main(args)` for `python -m radial <stage>`.
Stages import library modules (radial.*), never each other."""
