from glit_deploy.cli import main

main()
