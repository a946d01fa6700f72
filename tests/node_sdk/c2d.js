'use strict';
// Cloud-to-device scenario: the device listens with client.on('message') and
// completes each message with client.complete(): event `message` (data,
// messageId, user properties) and `completed` per message, until
// args.count messages are completed.
const { call, connect, emit, main } = require('./common');

main(async (args) => {
  const client = await connect(args);
  await new Promise((resolve, reject) => {
    let completed = 0;
    client.on('message', (msg) => {
      const properties = {};
      for (const p of msg.properties.propertyList) properties[p.key] = p.value;
      emit('message', { data: msg.data.toString('utf8'), messageId: msg.messageId, properties });
      call((done) => client.complete(msg, done)).then(() => {
        emit('completed', { messageId: msg.messageId });
        completed += 1;
        if (completed >= args.count) resolve();
      }, reject);
    });
  });
  await client.close();
});
