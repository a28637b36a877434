"""HF ⇄ jaxtune weights (installed as `jaxtune.converters`)."""
