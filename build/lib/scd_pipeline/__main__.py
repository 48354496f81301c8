from scd_pipeline.cli import app

app(prog_name="scd-pipeline")
