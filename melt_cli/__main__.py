from melt_cli.app import main

main()
