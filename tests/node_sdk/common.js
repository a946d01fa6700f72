'use strict';
// What every scenario script shares: its arguments (one JSON document in
// argv[2]), one JSON line on stdout per event, a deadline, and a device
// client of the unchanged Azure IoT device SDK connected over MQTT to the
// gateway named in the connection string (GatewayHostName), trusting the
// hub's test CA through the SDK's `ca` option. The scenarios themselves are
// in twin.js, method.js and c2d.js; the Python side is tests/test_node_sdk.py.

const fs = require('fs');
const { Client } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

function emit(event, fields) {
  // stdout is a pipe: written synchronously on Linux, so nothing is lost
  // when the script exits right after.
  process.stdout.write(JSON.stringify(Object.assign({ event }, fields || {})) + '\n');
}

function describe(err) {
  if (!err) return String(err);
  const parts = [`${err.name || 'Error'}: ${err.message || err}`];
  let cause = err.transportError || err.innerError || err.cause;
  for (let i = 0; cause && i < 4; i++) {
    parts.push(`caused by ${cause.name || 'Error'}: ${cause.message || cause}`);
    cause = cause.transportError || cause.innerError || cause.cause;
  }
  return parts.join('; ');
}

function versions() {
  const v = { node: process.version };
  for (const name of ['azure-iot-device', 'azure-iot-device-mqtt']) {
    try {
      v[name] = require(`${name}/package.json`).version;
    } catch (e) {
      v[name] = null;
    }
  }
  return v;
}

async function connect(args) {
  const client = Client.fromConnectionString(args.cs, Mqtt);
  client.on('error', (err) => emit('client_error', { error: describe(err) }));
  client.on('disconnect', (reason) => emit('disconnected', { reason: reason ? describe(reason) : null }));
  await client.setOptions({ ca: fs.readFileSync(args.ca, 'utf8') });
  await client.open();
  emit('connected', { versions: versions() });
  return client;
}

// A callback-style SDK call as a promise.
function call(fn) {
  return new Promise((resolve, reject) => fn((err, result) => (err ? reject(err) : resolve(result))));
}

// Runs `scenario(args)`; prints `done` and exits 0 when it resolves, `error`
// and exits 1 when it fails, `error` and exits 2 past args.timeout seconds.
function main(scenario) {
  const args = JSON.parse(process.argv[2]);
  const timeout = args.timeout || 60;
  setTimeout(() => {
    emit('error', { error: `the scenario did not end within ${timeout} s` });
    process.exit(2);
  }, timeout * 1000);
  scenario(args).then(
    () => {
      emit('done');
      process.exit(0);
    },
    (err) => {
      emit('error', { error: describe(err), stack: err && err.stack ? String(err.stack).slice(0, 3000) : null });
      process.exit(1);
    }
  );
}

module.exports = { call, connect, describe, emit, main };
