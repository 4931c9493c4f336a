from icl_cli.cli.app import main

main()
