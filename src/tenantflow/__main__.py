from tenantflow.cli import main

main()
