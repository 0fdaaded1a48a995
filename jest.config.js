/** @type {import('jest').Config} */
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  // SwiftShader is slow: allow long numerical tests.
  testTimeout: 300000,
  globalSetup: '<rootDir>/test/harness/global_setup.ts',
  reporters: ['default', '<rootDir>/test/harness/summary_reporter.js'],
  // Sources that import the package by name (kernels/, like users do) get
  // the sources, as the typecheck's `paths` does.
  moduleNameMapper: {'^tfjs-flash-attention$': '<rootDir>/src/index.ts'},
  transform: {
    '^.+\\.ts$': ['ts-jest', {diagnostics: false}],
  },
};
