from scd_pipeline.cli import main

main()
